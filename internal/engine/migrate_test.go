package engine

import (
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/projection"
)

// TestAdmitMigrate: a migrate is placed away from the VM's host by
// prepare's rules, needs both hosts able to migrate and a live source,
// and carries where it goes and the state it returns to; a cancel needs
// a migration in flight and abandons it.
func TestAdmitMigrate(t *testing.T) {
	hb := func(name string, alive, migrate bool, free int) *api.Host {
		return &api.Host{Alive: alive, Heartbeat: api.Heartbeat{Host: name, Backends: []api.BackendTag{api.BackendQEMU},
			DefaultBackend: api.BackendQEMU, Capacity: api.Resources{Vcpus: 8, MemoryMB: free},
			Capabilities: map[api.BackendTag]api.Capabilities{api.BackendQEMU: {Suspend: true, Resume: true, Migrate: migrate}}}}
	}
	table := hostTable{
		"h1":   hb("h1", true, true, 8000),
		"h2":   hb("h2", true, true, 4000),
		"h3":   hb("h3", true, true, 6000),
		"old":  hb("old", true, false, 9000),
		"gone": hb("gone", false, true, 9000),
		"tiny": hb("tiny", true, true, 100),
	}
	table["h3"].Cordon = &api.Cordon{Reason: "maintenance"}
	adm := admission{hosts: table, lostAfter: 10 * time.Second}
	rec := func(state api.VmState, host string) *api.VmRecord {
		spec := api.VmSpec{Name: "web1", Backend: api.BackendQEMU, ImagePath: "/i.qcow2", Vcpus: 1, MemoryMB: 512}
		return &api.VmRecord{Name: "web1", State: state, Host: host, Backend: api.BackendQEMU, Generation: 1, LastSeq: 7,
			Handle: &api.VmHandle{ID: "x", Name: "web1", Backend: api.BackendQEMU, Host: host, Spec: &spec}}
	}
	migrating := rec(api.StateMigrating, "h1")
	migrating.Migration = &api.Migration{From: "h1", To: "h2", Mode: api.MigrateLive, Before: api.StateSuspended}
	migrating.InFlight = []api.InFlight{{CommandID: "m1", Action: fsm.ActMigrate, Seq: 7}}
	uefi := rec(api.StateRunning, "h1")
	uefi.Handle.Spec.UEFI = true
	for _, c := range []struct {
		name   string
		rec    *api.VmRecord
		cmd    api.Command
		to     string // accepted to this host, or
		reject string
		mode   string
	}{
		{"running: placed on the other host with the most room, not cordoned, not the source", rec(api.StateRunning, "h1"), api.Command{}, "h2", "", api.MigrateLive},
		{"suspended moves live", rec(api.StateSuspended, "h1"), api.Command{Host: "h2"}, "h2", "", api.MigrateLive},
		{"stopped moves cold", rec(api.StateStopped, "h1"), api.Command{Host: "h2"}, "h2", "", api.MigrateCold},
		{"prepared moves cold", rec(api.StatePrepared, "h1"), api.Command{Host: "h2"}, "h2", "", api.MigrateCold},
		{"to its own host", rec(api.StateRunning, "h1"), api.Command{Host: "h1"}, "", "already on host h1", ""},
		{"to a cordoned host", rec(api.StateRunning, "h1"), api.Command{Host: "h3"}, "", "cordoned", ""},
		{"to a lost host", rec(api.StateRunning, "h1"), api.Command{Host: "gone"}, "", "not alive", ""},
		{"to a host without room", rec(api.StateRunning, "h1"), api.Command{Host: "tiny"}, "", "tiny", ""},
		{"to a host whose backend cannot migrate", rec(api.StateRunning, "h1"), api.Command{Host: "old"}, "", "cannot migrate", ""},
		{"from a host whose backend cannot migrate", rec(api.StateRunning, "old"), api.Command{}, "", "cannot migrate", ""},
		{"from a lost host", rec(api.StateRunning, "gone"), api.Command{}, "", "is lost", ""},
		{"a failed vm", rec(api.StateFailed, "h1"), api.Command{}, "", "cannot migrate: vm is failed", ""},
		{"a vm in flight", rec(api.StateStarting, "h1"), api.Command{}, "", "in flight", ""},
		{"a uefi vm", uefi, api.Command{}, "", "UEFI", ""},
		{"no vm", &api.VmRecord{Name: "web1", State: fsm.StateAbsent}, api.Command{}, "", "does not exist", ""},
		{"a migrating vm", migrating, api.Command{}, "", "only its cancel is accepted", ""},
		{"cancel without a migration", rec(api.StateRunning, "h1"), api.Command{Cancel: true}, "", "no migration in flight", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			ev := api.Event{VM: "web1", CommandID: "c9", Action: fsm.ActMigrate}
			err := adm.admit(c.rec, fsm.ActMigrate, &c.cmd, &ev)
			if c.reject != "" {
				if err == nil || !strings.Contains(err.Error(), c.reject) {
					t.Fatalf("admit = %v, want a rejection with %q", err, c.reject)
				}
				return
			}
			if err != nil {
				t.Fatalf("admit: %v", err)
			}
			m := ev.Migration
			if ev.Type != api.TypeAccepted || ev.State != api.StateMigrating || ev.Host != c.rec.Host || m == nil ||
				m.From != c.rec.Host || m.To != c.to || m.Mode != c.mode || m.Before != c.rec.State || ev.Spec == nil {
				t.Fatalf("accepted %+v migration %+v; want to %s, mode %s, before %s", ev, m, c.to, c.mode, c.rec.State)
			}
			if qs := events.TasksOf(&ev, 9); len(qs) != 2 || qs[0].Task.Host != c.rec.Host || qs[1].Task.Host != c.to ||
				qs[0].Task.Migration.Role != api.RoleSource || qs[1].Task.Migration.Role != api.RoleTarget || qs[0].MsgID == qs[1].MsgID {
				t.Fatalf("tasks of a migrate: %+v", qs)
			}
		})
	}
	t.Run("cancel", func(t *testing.T) {
		ev := api.Event{VM: "web1", CommandID: "c9", Action: fsm.ActMigrate}
		if err := adm.admit(migrating, fsm.ActMigrate, &api.Command{Cancel: true}, &ev); err != nil {
			t.Fatal(err)
		}
		if !ev.Cancel || ev.State != api.StateSuspended || len(ev.Abandoned) != 1 || ev.Abandoned[0].CommandID != "m1" || ev.Host != "h1" {
			t.Fatalf("cancel: %+v", ev)
		}
		if qs := events.TasksOf(&ev, 9); len(qs) != 0 {
			t.Fatalf("a cancel queues tasks: %+v", qs)
		}
		// Folded, the vm is back where and as it was, nothing in flight.
		r := projection.Fold(migrating, &ev, 8)
		if r.State != api.StateSuspended || r.Host != "h1" || r.Migration != nil || len(r.InFlight) != 0 {
			t.Fatalf("after the cancel: %+v", r)
		}
	})
}

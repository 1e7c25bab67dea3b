package engine

import (
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/vm"
)

// TestAdmitMigrate: a migrate is placed away from the VM's host by
// prepare's rules, needs both hosts able to migrate and a live source,
// and carries where it goes and the state it returns to; a cancel needs
// a migration in flight and abandons it.
func TestAdmitMigrate(t *testing.T) {
	hb := func(name string, alive, migrate bool, free int) *hosts.Host {
		return &hosts.Host{Alive: alive, Heartbeat: hosts.Heartbeat{Host: name, Backends: []vm.BackendTag{vm.BackendQEMU},
			DefaultBackend: vm.BackendQEMU, Capacity: hosts.Resources{Vcpus: 8, MemoryMB: free},
			Capabilities: map[vm.BackendTag]backends.Capabilities{vm.BackendQEMU: {Suspend: true, Resume: true, Migrate: migrate}}}}
	}
	table := hostTable{
		"h1":   hb("h1", true, true, 8000),
		"h2":   hb("h2", true, true, 4000),
		"h3":   hb("h3", true, true, 6000),
		"old":  hb("old", true, false, 9000),
		"gone": hb("gone", false, true, 9000),
		"tiny": hb("tiny", true, true, 100),
	}
	table["h3"].Cordon = &hosts.Cordon{Reason: "maintenance"}
	adm := admission{hosts: table, lostAfter: 10 * time.Second}
	rec := func(state vm.VmState, host string) *projection.VmRecord {
		spec := vm.VmSpec{Name: "web1", Backend: vm.BackendQEMU, ImagePath: "/i.qcow2", Vcpus: 1, MemoryMB: 512}
		return &projection.VmRecord{Name: "web1", State: state, Host: host, Backend: vm.BackendQEMU, Generation: 1, LastSeq: 7,
			Handle: &vm.VmHandle{ID: "x", Name: "web1", Backend: vm.BackendQEMU, Host: host, Spec: &spec}}
	}
	migrating := rec(vm.StateMigrating, "h1")
	migrating.Migration = &events.Migration{From: "h1", To: "h2", Mode: events.MigrateLive, Before: vm.StateSuspended}
	migrating.InFlight = []projection.InFlight{{CommandID: "m1", Action: fsm.ActMigrate, Seq: 7}}
	uefi := rec(vm.StateRunning, "h1")
	uefi.Handle.Spec.UEFI = true
	for _, c := range []struct {
		name   string
		rec    *projection.VmRecord
		cmd    events.Command
		to     string // accepted to this host, or
		reject string
		mode   string
	}{
		{"running: placed on the other host with the most room, not cordoned, not the source", rec(vm.StateRunning, "h1"), events.Command{}, "h2", "", events.MigrateLive},
		{"suspended moves live", rec(vm.StateSuspended, "h1"), events.Command{Host: "h2"}, "h2", "", events.MigrateLive},
		{"stopped moves cold", rec(vm.StateStopped, "h1"), events.Command{Host: "h2"}, "h2", "", events.MigrateCold},
		{"prepared moves cold", rec(vm.StatePrepared, "h1"), events.Command{Host: "h2"}, "h2", "", events.MigrateCold},
		{"to its own host", rec(vm.StateRunning, "h1"), events.Command{Host: "h1"}, "", "already on host h1", ""},
		{"to a cordoned host", rec(vm.StateRunning, "h1"), events.Command{Host: "h3"}, "", "cordoned", ""},
		{"to a lost host", rec(vm.StateRunning, "h1"), events.Command{Host: "gone"}, "", "not alive", ""},
		{"to a host without room", rec(vm.StateRunning, "h1"), events.Command{Host: "tiny"}, "", "tiny", ""},
		{"to a host whose backend cannot migrate", rec(vm.StateRunning, "h1"), events.Command{Host: "old"}, "", "cannot migrate", ""},
		{"from a host whose backend cannot migrate", rec(vm.StateRunning, "old"), events.Command{}, "", "cannot migrate", ""},
		{"from a lost host", rec(vm.StateRunning, "gone"), events.Command{}, "", "is lost", ""},
		{"a failed vm", rec(vm.StateFailed, "h1"), events.Command{}, "", "cannot migrate: vm is failed", ""},
		{"a vm in flight", rec(vm.StateStarting, "h1"), events.Command{}, "", "in flight", ""},
		{"a uefi vm", uefi, events.Command{}, "", "UEFI", ""},
		{"no vm", &projection.VmRecord{Name: "web1", State: fsm.StateAbsent}, events.Command{}, "", "does not exist", ""},
		{"a migrating vm", migrating, events.Command{}, "", "only its cancel is accepted", ""},
		{"cancel without a migration", rec(vm.StateRunning, "h1"), events.Command{Cancel: true}, "", "no migration in flight", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			ev := events.Event{VM: "web1", CommandID: "c9", Action: fsm.ActMigrate}
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
			if ev.Type != events.TypeAccepted || ev.State != vm.StateMigrating || ev.Host != c.rec.Host || m == nil ||
				m.From != c.rec.Host || m.To != c.to || m.Mode != c.mode || m.Before != c.rec.State || ev.Spec == nil {
				t.Fatalf("accepted %+v migration %+v; want to %s, mode %s, before %s", ev, m, c.to, c.mode, c.rec.State)
			}
			if qs := events.TasksOf(&ev, 9); len(qs) != 2 || qs[0].Task.Host != c.rec.Host || qs[1].Task.Host != c.to ||
				qs[0].Task.Migration.Role != events.RoleSource || qs[1].Task.Migration.Role != events.RoleTarget || qs[0].MsgID == qs[1].MsgID {
				t.Fatalf("tasks of a migrate: %+v", qs)
			}
		})
	}
	t.Run("cancel", func(t *testing.T) {
		ev := events.Event{VM: "web1", CommandID: "c9", Action: fsm.ActMigrate}
		if err := adm.admit(migrating, fsm.ActMigrate, &events.Command{Cancel: true}, &ev); err != nil {
			t.Fatal(err)
		}
		if !ev.Cancel || ev.State != vm.StateSuspended || len(ev.Abandoned) != 1 || ev.Abandoned[0].CommandID != "m1" || ev.Host != "h1" {
			t.Fatalf("cancel: %+v", ev)
		}
		if qs := events.TasksOf(&ev, 9); len(qs) != 0 {
			t.Fatalf("a cancel queues tasks: %+v", qs)
		}
		// Folded, the vm is back where and as it was, nothing in flight.
		r := projection.Fold(migrating, &ev, 8)
		if r.State != vm.StateSuspended || r.Host != "h1" || r.Migration != nil || len(r.InFlight) != 0 {
			t.Fatalf("after the cancel: %+v", r)
		}
	})
}

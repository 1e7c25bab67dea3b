package engine

import (
	"errors"
	"sort"
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

// hostTable is a hostView from a table: no NATS.
type hostTable map[string]struct {
	hb    *hosts.Heartbeat
	alive bool
}

func (t hostTable) Get(h string) (*hosts.Heartbeat, bool) {
	e, ok := t[h]
	if !ok {
		return nil, false
	}
	return e.hb, e.alive
}

func (t hostTable) Alive() []*hosts.Heartbeat {
	var out []*hosts.Heartbeat
	for _, e := range t {
		if e.alive {
			out = append(out, e.hb)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Host < out[j].Host })
	return out
}

func (t hostTable) Place(b vm.BackendTag) (*hosts.Heartbeat, error) {
	best := hosts.Best(t.Alive(), b)
	if best == nil {
		return nil, errors.New("no alive host has it")
	}
	return best, nil
}

func TestAdmit(t *testing.T) {
	hb := func(name string, free int, bs ...vm.BackendTag) *hosts.Heartbeat {
		h := &hosts.Heartbeat{Host: name, Backends: bs, DefaultBackend: bs[0], Capacity: hosts.Resources{MemoryMB: free}}
		for _, b := range bs {
			if b == vm.BackendPropolis {
				h.Capabilities = map[vm.BackendTag]backends.Capabilities{b: {}}
			}
		}
		return h
	}
	table := hostTable{
		"h1":   {hb("h1", 1000, vm.BackendQEMU, vm.BackendNoop), true},
		"h2":   {hb("h2", 4000, vm.BackendNoop), true},
		"pp":   {hb("pp", 100, vm.BackendPropolis), true},
		"gone": {hb("gone", 9000, vm.BackendNoop, vm.BackendQEMU), false},
	}
	adm := admission{hosts: table, lostAfter: 10 * time.Second}
	absent := &projection.VmRecord{Name: "web1", State: fsm.StateAbsent}
	on := func(state vm.VmState, host string, b vm.BackendTag) *projection.VmRecord {
		return &projection.VmRecord{Name: "web1", State: state, Host: host, Backend: b, Generation: 1, LastSeq: 7}
	}
	prep := func(spec vm.VmSpec, host string) *events.Command { return &events.Command{Spec: &spec, Host: host} }
	for _, c := range []struct {
		name     string
		rec      *projection.VmRecord
		act      fsm.Action
		cmd      *events.Command
		wantHost string // accepted on this host, or
		reject   string // rejected with a reason containing this
	}{
		{"no backend named: a real hypervisor's host before more free memory on a Noop-only one", absent, fsm.ActPrepare, prep(vm.VmSpec{ImagePath: "/i.qcow2"}, ""), "h1", ""},
		{"noop asked for: the most free memory", absent, fsm.ActPrepare, prep(vm.VmSpec{Backend: vm.BackendNoop}, ""), "h2", ""},
		{"prepare needing qemu skips hosts without it", absent, fsm.ActPrepare, prep(vm.VmSpec{Backend: vm.BackendQEMU, ImagePath: "/i.qcow2"}, ""), "h1", ""},
		{"a pin wins over free memory", absent, fsm.ActPrepare, prep(vm.VmSpec{}, "h2"), "h2", ""},
		{"a pin to an unknown host", absent, fsm.ActPrepare, prep(vm.VmSpec{}, "nope"), "", `host: "nope" is not a known host (alive hosts: h1, h2, pp)`},
		{"a pin to a lost host", absent, fsm.ActPrepare, prep(vm.VmSpec{}, "gone"), "", `host: "gone" is not alive`},
		{"a pin to a host without the backend", absent, fsm.ActPrepare, prep(vm.VmSpec{Backend: vm.BackendQEMU, ImagePath: "/i"}, "h2"), "", `"h2" has no qemu backend`},
		{"spec name must match the subject", absent, fsm.ActPrepare, prep(vm.VmSpec{Name: "other"}, ""), "", `spec.name: "other" must match`},
		{"an invalid spec", absent, fsm.ActPrepare, prep(vm.VmSpec{Vcpus: 999}, ""), "", "spec.vcpus: 999 is out of range"},
		{"prepare of an existing VM", on(vm.StateRunning, "h1", vm.BackendNoop), fsm.ActPrepare, prep(vm.VmSpec{}, ""), "", "cannot prepare: vm is running"},
		{"start of a VM that does not exist", absent, fsm.ActStart, &events.Command{}, "", "cannot start: vm does not exist"},
		{"start of a prepared VM stays on its host", on(vm.StatePrepared, "h1", vm.BackendNoop), fsm.ActStart, &events.Command{}, "h1", ""},
		{"suspend of a suspended VM", on(vm.StateSuspended, "h1", vm.BackendNoop), fsm.ActSuspend, &events.Command{}, "", "already suspended"},
		{"any command on a lost host", on(vm.StateRunning, "gone", vm.BackendNoop), fsm.ActStop, &events.Command{}, "", "host gone of vm web1 is lost"},
		{"destroy on a lost host", on(vm.StateRunning, "gone", vm.BackendNoop), fsm.ActDestroy, &events.Command{}, "", "host gone of vm web1 is lost"},
		{"a backend that cannot suspend", on(vm.StateRunning, "pp", vm.BackendPropolis), fsm.ActSuspend, &events.Command{}, "", "backend propolis cannot suspend"},
		{"the same backend can stop", on(vm.StateRunning, "pp", vm.BackendPropolis), fsm.ActStop, &events.Command{TimeoutS: 9}, "pp", ""},
		{"destroy wins while in flight", on(vm.StateStarting, "h1", vm.BackendNoop), fsm.ActDestroy, &events.Command{}, "h1", ""},
		{"only destroy while in flight", on(vm.StateStarting, "h1", vm.BackendNoop), fsm.ActStop, &events.Command{}, "", "only destroy is accepted"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ev := events.Event{VM: "web1", Action: c.act}
			err := adm.admit(c.rec, c.act, c.cmd, &ev)
			if c.reject != "" {
				if err == nil || !strings.Contains(err.Error(), c.reject) {
					t.Fatalf("admit = %v, want a rejection containing %q", err, c.reject)
				}
				if ev.Type != "" {
					t.Fatalf("a rejection filled the event: %+v", ev)
				}
				return
			}
			if err != nil {
				t.Fatalf("admit: %v", err)
			}
			next, _ := fsm.Decide(c.rec.CurrentState(), c.act)
			if ev.Type != events.TypeAccepted || ev.Host != c.wantHost || ev.State != next {
				t.Fatalf("accepted %+v, want host %s state %s", ev, c.wantHost, next)
			}
			if c.act == fsm.ActPrepare && (ev.Spec == nil || ev.Spec.Name != "web1" || ev.Backend == "" || ev.Spec.Backend != ev.Backend) {
				t.Fatalf("prepare's spec and backend: %+v", ev)
			}
			if c.cmd.TimeoutS != ev.TimeoutS {
				t.Fatalf("timeout_s %d, want %d", ev.TimeoutS, c.cmd.TimeoutS)
			}
		})
	}
}

// Without a host that has the backend, prepare is rejected by placement.
func TestAdmitNoHostWithBackend(t *testing.T) {
	adm := admission{hosts: hostTable{"h2": {&hosts.Heartbeat{Host: "h2", Backends: []vm.BackendTag{vm.BackendNoop}, DefaultBackend: vm.BackendNoop}, true}}, lostAfter: time.Second}
	ev := events.Event{VM: "web1", Action: fsm.ActPrepare}
	cmd := &events.Command{Spec: &vm.VmSpec{Backend: vm.BackendQEMU, ImagePath: "/i"}}
	err := adm.admit(&projection.VmRecord{Name: "web1", State: fsm.StateAbsent}, fsm.ActPrepare, cmd, &ev)
	if err == nil || !strings.Contains(err.Error(), "placement: no alive host has it") {
		t.Fatalf("admit = %v", err)
	}
}

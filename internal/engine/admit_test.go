package engine

import (
	"fmt"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
)

// hostTable is a hostView from a table: no NATS.
type hostTable map[string]*api.Host

func (t hostTable) Get(h string) *api.Host { return t[h] }

func (t hostTable) List() []*api.Host {
	var out []*api.Host
	for _, h := range t {
		out = append(out, h)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Host < out[j].Host })
	return out
}

func TestAdmit(t *testing.T) {
	hb := func(name string, alive bool, free int, bs ...api.BackendTag) *api.Host {
		h := &api.Host{Alive: alive, Heartbeat: api.Heartbeat{Host: name, Backends: bs, DefaultBackend: bs[0], Capacity: api.Resources{Vcpus: 8, MemoryMB: free}}}
		for _, b := range bs {
			if b == api.BackendPropolis {
				h.Capabilities = map[api.BackendTag]api.Capabilities{b: {}}
			}
		}
		return h
	}
	table := hostTable{
		"h1":   hb("h1", true, 2000, api.BackendQEMU, api.BackendNoop),
		"h2":   hb("h2", true, 4000, api.BackendNoop),
		"pp":   hb("pp", true, 100, api.BackendPropolis),
		"gone": hb("gone", false, 9000, api.BackendNoop, api.BackendQEMU),
		"big":  hb("big", true, 64000, api.BackendQEMU),
	}
	table["big"].Cordon = &api.Cordon{Reason: "maintenance"}
	// h1 has 2000 MiB; VMs placed there take 600 of them and 6 of its 8 vCPUs.
	placed := func(h string) api.Resources {
		if h == "h1" {
			return api.Resources{Vcpus: 6, MemoryMB: 600}
		}
		return api.Resources{}
	}
	adm := admission{hosts: table, lostAfter: 10 * time.Second, placed: placed}
	absent := &api.VmRecord{Name: "web1", State: fsm.StateAbsent}
	on := func(state api.VmState, host string, b api.BackendTag) *api.VmRecord {
		return &api.VmRecord{Name: "web1", State: state, Host: host, Backend: b, Generation: 1, LastSeq: 7}
	}
	inflight := func(state api.VmState, host string) *api.VmRecord {
		r := on(state, host, api.BackendNoop)
		r.InFlight = []api.InFlight{{CommandID: "d1", Action: fsm.ActDestroy, Seq: 7}}
		return r
	}
	prep := func(spec api.VmSpec, host string) *api.Command { return &api.Command{Spec: &spec, Host: host} }
	for _, c := range []struct {
		name     string
		rec      *api.VmRecord
		act      fsm.Action
		cmd      *api.Command
		wantHost string // accepted on this host, or
		reject   string // rejected with a reason containing this
	}{
		{"no backend named: a real hypervisor's host before more free memory on a Noop-only one", absent, fsm.ActPrepare, prep(api.VmSpec{ImagePath: "/i.qcow2"}, ""), "h1", ""},
		{"noop asked for: the most free memory", absent, fsm.ActPrepare, prep(api.VmSpec{Backend: api.BackendNoop}, ""), "h2", ""},
		{"prepare needing qemu skips hosts without it", absent, fsm.ActPrepare, prep(api.VmSpec{Backend: api.BackendQEMU, ImagePath: "/i.qcow2"}, ""), "h1", ""},
		{"a pin wins over free memory", absent, fsm.ActPrepare, prep(api.VmSpec{}, "h2"), "h2", ""},
		{"a pin to an unknown host", absent, fsm.ActPrepare, prep(api.VmSpec{}, "nope"), "", `host: "nope" is not a known host (alive hosts: big, h1, h2, pp)`},
		{"a pin to a lost host", absent, fsm.ActPrepare, prep(api.VmSpec{}, "gone"), "", `host: "gone" cannot take it: not alive`},
		{"a pin to a host without the backend", absent, fsm.ActPrepare, prep(api.VmSpec{Backend: api.BackendQEMU, ImagePath: "/i"}, "h2"), "", `"h2" cannot take it: no qemu backend`},
		{"a pin to a cordoned host", absent, fsm.ActPrepare, prep(api.VmSpec{ImagePath: "/i"}, "big"), "", `host: "big" cannot take it: cordoned`},
		{"a cordoned host takes no placement, however much room it has", absent, fsm.ActPrepare, prep(api.VmSpec{Backend: api.BackendQEMU, ImagePath: "/i", MemoryMB: 300}, ""), "h1", ""},
		{"what is placed counts: 1400 MiB left on h1", absent, fsm.ActPrepare, prep(api.VmSpec{Backend: api.BackendQEMU, ImagePath: "/i", MemoryMB: 1500}, ""), "",
			"placement: no host can take it (big: cordoned; gone: lost; h1: needs 1500 MiB memory, 1400 of 2000 free; h2: no qemu backend"},
		{"vCPUs count too", absent, fsm.ActPrepare, prep(api.VmSpec{Backend: api.BackendQEMU, ImagePath: "/i", Vcpus: 3}, "h1"), "", `host: "h1" cannot take it: needs 3 vCPUs, 2 of 8 free`},
		{"a Noop VM takes no room", absent, fsm.ActPrepare, prep(api.VmSpec{Backend: api.BackendNoop, MemoryMB: 50000}, "h1"), "h1", ""},
		{"spec name must match the subject", absent, fsm.ActPrepare, prep(api.VmSpec{Name: "other"}, ""), "", `spec.name: "other" must match`},
		{"an invalid spec", absent, fsm.ActPrepare, prep(api.VmSpec{Vcpus: 999}, ""), "", "spec.vcpus: 999 is out of range"},
		{"prepare of an existing VM", on(api.StateRunning, "h1", api.BackendNoop), fsm.ActPrepare, prep(api.VmSpec{}, ""), "", "cannot prepare: vm is running"},
		{"start of a VM that does not exist", absent, fsm.ActStart, &api.Command{}, "", "cannot start: vm does not exist"},
		{"start of a prepared VM stays on its host", on(api.StatePrepared, "h1", api.BackendNoop), fsm.ActStart, &api.Command{}, "h1", ""},
		{"suspend of a suspended VM", on(api.StateSuspended, "h1", api.BackendNoop), fsm.ActSuspend, &api.Command{}, "", "already suspended"},
		{"any command on a lost host", on(api.StateRunning, "gone", api.BackendNoop), fsm.ActStop, &api.Command{}, "", "host gone of vm web1 is lost"},
		{"destroy on a lost host", on(api.StateRunning, "gone", api.BackendNoop), fsm.ActDestroy, &api.Command{}, "", "if it will not come back: vmctl destroy --forget web1"},
		{"forget on a lost host", on(api.StateRunning, "gone", api.BackendNoop), fsm.ActDestroy, &api.Command{Forget: true}, "gone", ""},
		{"forget while a destroy is in flight to the lost host", inflight(api.StateDestroying, "gone"), fsm.ActDestroy, &api.Command{Forget: true}, "gone", ""},
		{"forget on an alive host", on(api.StateRunning, "h1", api.BackendNoop), fsm.ActDestroy, &api.Command{Forget: true}, "", "forget: host h1 of vm web1 is alive"},
		{"forget of a destroyed VM", on(api.StateDestroyed, "gone", api.BackendNoop), fsm.ActDestroy, &api.Command{Forget: true}, "", "already destroyed"},
		{"forget of no VM", absent, fsm.ActDestroy, &api.Command{Forget: true}, "", "there is no vm web1 to forget"},
		{"a backend that cannot suspend", on(api.StateRunning, "pp", api.BackendPropolis), fsm.ActSuspend, &api.Command{}, "", "backend propolis cannot suspend"},
		{"the same backend can stop", on(api.StateRunning, "pp", api.BackendPropolis), fsm.ActStop, &api.Command{TimeoutS: 9}, "pp", ""},
		{"destroy wins while in flight", on(api.StateStarting, "h1", api.BackendNoop), fsm.ActDestroy, &api.Command{}, "h1", ""},
		{"only destroy while in flight", on(api.StateStarting, "h1", api.BackendNoop), fsm.ActStop, &api.Command{}, "", "only destroy is accepted"},
		{"a stop's timeout up to the limit", on(api.StateRunning, "h1", api.BackendNoop), fsm.ActStop, &api.Command{TimeoutS: 900}, "h1", ""},
		{"a stop that would hold the VM for a day", on(api.StateRunning, "h1", api.BackendNoop), fsm.ActStop, &api.Command{TimeoutS: 86400}, "",
			"timeout_s: 86400 s is over the 900 s this engine allows (--max-command-timeout 15m0s); ask for at most 900"},
		{"a destroy's timeout too", on(api.StateStopping, "h1", api.BackendNoop), fsm.ActDestroy, &api.Command{TimeoutS: 901}, "", "timeout_s: 901 s is over"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ev := api.Event{VM: "web1", Action: c.act}
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
			if c.cmd.Forget {
				next, _ = fsm.Forget(c.rec.CurrentState())
				var want []api.Abandoned
				for _, f := range c.rec.InFlight {
					want = append(want, api.Abandoned{CommandID: f.CommandID, Action: f.Action, Seq: f.Seq})
				}
				if !ev.Forget || !reflect.DeepEqual(ev.Abandoned, want) {
					t.Fatalf("forget: %+v, want forget with abandoned %v", ev, want)
				}
			}
			if ev.Type != api.TypeAccepted || ev.Host != c.wantHost || ev.State != next {
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
	adm := admission{hosts: hostTable{"h2": {Alive: true, Heartbeat: api.Heartbeat{Host: "h2", Backends: []api.BackendTag{api.BackendNoop}, DefaultBackend: api.BackendNoop}}}, lostAfter: time.Second}
	ev := api.Event{VM: "web1", Action: fsm.ActPrepare}
	cmd := &api.Command{Spec: &api.VmSpec{Backend: api.BackendQEMU, ImagePath: "/i"}}
	err := adm.admit(&api.VmRecord{Name: "web1", State: fsm.StateAbsent}, fsm.ActPrepare, cmd, &ev)
	if err == nil || !strings.Contains(err.Error(), "placement: no host can take it (h2: no qemu backend") {
		t.Fatalf("admit = %v", err)
	}
}

// countTable is a vmCounter from a table.
type countTable struct {
	host   map[string]int
	prefix map[string]int
}

func (c countTable) onHost(h string) int     { return c.host[h] }
func (c countTable) withPrefix(p string) int { return c.prefix[p] }

// Quotas: a full host is passed over by placement (and a pin to it is
// rejected); a name prefix at its quota rejects the prepare.
func TestAdmitQuotas(t *testing.T) {
	h := func(name string) *api.Host {
		return &api.Host{Alive: true, Heartbeat: api.Heartbeat{Host: name, Backends: []api.BackendTag{api.BackendNoop}, DefaultBackend: api.BackendNoop}}
	}
	adm := admission{
		hosts: hostTable{"h1": h("h1"), "h2": h("h2")}, lostAfter: time.Second,
		quotas: Quotas{PerHost: 2, Prefix: map[string]int{"ci-": 3}},
		count:  countTable{host: map[string]int{"h1": 2, "h2": 1}, prefix: map[string]int{"ci-": 3}},
	}
	absent := func(name string) *api.VmRecord {
		return &api.VmRecord{Name: name, State: fsm.StateAbsent}
	}
	prep := func(pin string) *api.Command { return &api.Command{Spec: &api.VmSpec{}, Host: pin} }
	for _, c := range []struct {
		name, vm, pin, wantHost, reject string
	}{
		{"the full host is passed over", "web1", "", "h2", ""},
		{"a pin to the full host", "web1", "h1", "", `host: "h1" cannot take it: full (2 VMs, --max-vms-per-host 2)`},
		{"a prefix at its quota", "ci-9", "", "", "quota: 3 VMs named ci-* exist, the most allowed (--quota ci-=3)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ev := api.Event{VM: c.vm, Action: fsm.ActPrepare}
			err := adm.admit(absent(c.vm), fsm.ActPrepare, prep(c.pin), &ev)
			if c.reject != "" {
				if err == nil || !strings.Contains(err.Error(), c.reject) {
					t.Fatalf("admit = %v, want %q", err, c.reject)
				}
				return
			}
			if err != nil || ev.Host != c.wantHost {
				t.Fatalf("admit = %v, host %q, want %q", err, ev.Host, c.wantHost)
			}
		})
	}
}

// A spec that names its image goes only to a host that has it ready.
func TestAdmitNamedImage(t *testing.T) {
	hb := func(name string, free int) *api.Host {
		return &api.Host{Alive: true, Heartbeat: api.Heartbeat{Host: name, Backends: []api.BackendTag{api.BackendQEMU},
			DefaultBackend: api.BackendQEMU, Capacity: api.Resources{Vcpus: 8, MemoryMB: free}}}
	}
	// h2 has more room, but only h1 has debian-12.
	table := hostTable{"h1": hb("h1", 2000), "h2": hb("h2", 8000)}
	adm := admission{hosts: table, lostAfter: 10 * time.Second, hasImage: func(h, name string) bool { return h == "h1" && name == "debian-12" }}
	absent := &api.VmRecord{Name: "web1", State: fsm.StateAbsent}
	prepare := func(img, pin string) (api.Event, error) {
		ev := api.Event{VM: "web1"}
		err := adm.admit(absent, fsm.ActPrepare, &api.Command{Host: pin, Spec: &api.VmSpec{Image: img, MemoryMB: 512}}, &ev)
		return ev, err
	}
	if ev, err := prepare("debian-12", ""); err != nil || ev.Host != "h1" || ev.Spec.Image != "debian-12" {
		t.Fatalf("placed on %q (%v), want h1 (the one with the image)", ev.Host, err)
	}
	if _, err := prepare("debian-12", "h2"); err == nil || !strings.Contains(err.Error(), "no image debian-12") {
		t.Fatalf("pinned to a host without the image: %v", err)
	}
	if _, err := prepare("fedora-41", ""); err == nil || !strings.Contains(err.Error(), "h1: no image fedora-41") || !strings.Contains(err.Error(), "h2: no image fedora-41") {
		t.Fatalf("an image no host has: %v", err)
	}
}

// Placement breaks ties of free memory by the number of VMs a host has,
// then by name; more free memory still comes first.
func TestAdmitSpreadsTies(t *testing.T) {
	hb := func(name string, free int) *api.Host {
		return &api.Host{Alive: true, Heartbeat: api.Heartbeat{Host: name, Backends: []api.BackendTag{api.BackendNoop, api.BackendQEMU},
			DefaultBackend: api.BackendQEMU, Capacity: api.Resources{Vcpus: 64, MemoryMB: free}}}
	}
	for _, c := range []struct {
		name    string
		free    map[string]int
		vms     map[string]int
		backend api.BackendTag
		want    string
	}{
		{"equal hosts: the one with fewer VMs", map[string]int{"h1": 8000, "h2": 8000, "h3": 8000}, map[string]int{"h1": 3, "h2": 1, "h3": 2}, api.BackendNoop, "h2"},
		{"equal hosts and counts: the first by name", map[string]int{"h1": 8000, "h2": 8000}, map[string]int{"h1": 2, "h2": 2}, api.BackendNoop, "h1"},
		{"more free memory before fewer VMs", map[string]int{"h1": 8000, "h2": 9000}, map[string]int{"h1": 0, "h2": 5}, api.BackendQEMU, "h2"},
	} {
		t.Run(c.name, func(t *testing.T) {
			table := hostTable{}
			for h, free := range c.free {
				table[h] = hb(h, free)
			}
			adm := admission{hosts: table, lostAfter: time.Second, count: countTable{host: c.vms}}
			ev := api.Event{VM: "web1", Action: fsm.ActPrepare}
			cmd := &api.Command{Spec: &api.VmSpec{Backend: c.backend, ImagePath: "/i"}}
			if err := adm.admit(&api.VmRecord{Name: "web1", State: fsm.StateAbsent}, fsm.ActPrepare, cmd, &ev); err != nil || ev.Host != c.want {
				t.Fatalf("admit = %v, host %q, want %q", err, ev.Host, c.want)
			}
		})
	}
}

// Prepares decided at the same moment, before the projector has folded
// any of them, still spread over equal hosts: each placement is counted
// from its choice on.
func TestAdmitConcurrentPreparesSpread(t *testing.T) {
	table := hostTable{}
	for i := range 10 {
		name := fmt.Sprintf("h%02d", i)
		table[name] = &api.Host{Alive: true, Heartbeat: api.Heartbeat{Host: name, Backends: []api.BackendTag{api.BackendNoop}, DefaultBackend: api.BackendNoop}}
	}
	placed := newPlacedCount(nil)
	adm := admission{hosts: table, lostAfter: time.Second, placed: placed.on, count: placed, book: placed}
	var mu sync.Mutex
	per := map[string]int{}
	var wg sync.WaitGroup
	for i := range 100 {
		wg.Go(func() {
			name := fmt.Sprintf("vm%03d", i)
			ev := api.Event{VM: name, Action: fsm.ActPrepare}
			err := adm.admit(&api.VmRecord{Name: name, State: fsm.StateAbsent}, fsm.ActPrepare, &api.Command{Spec: &api.VmSpec{}}, &ev)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				t.Errorf("admit %s: %v", name, err)
				return
			}
			per[ev.Host]++
		})
	}
	wg.Wait()
	for h := range table {
		if per[h] != 10 {
			t.Fatalf("VMs per host: %v, want 10 on each", per)
		}
	}
}

// Purge: only a destroyed VM with nothing in flight, whoever asks.
func TestAdmitPurge(t *testing.T) {
	destroyed := &api.VmRecord{Name: "v", State: api.StateDestroyed, Host: "h1", Backend: api.BackendNoop, Generation: 2}
	byAdmin := &api.VmRecord{Name: "v", State: api.StateDestroyed, Host: "h1"}
	for _, c := range []struct {
		name   string
		rec    *api.VmRecord
		issuer string
		want   string // "" accepted, else part of the reason
	}{
		{"admin", destroyed, "", ""},
		{"an operator", destroyed, "alice", ""},
		{"without a backend", byAdmin, "bob", ""},
		{"running", &api.VmRecord{Name: "v", State: api.StateRunning, Host: "h1"}, "", "cannot purge: vm is running; purge is allowed from destroyed"},
		{"destroying", &api.VmRecord{Name: "v", State: api.StateDestroying, Host: "h1", InFlight: []api.InFlight{{CommandID: "d1", Action: fsm.ActDestroy}}}, "", "cannot purge: vm is destroying"},
		{"absent", &api.VmRecord{Name: "v", State: fsm.StateAbsent}, "", "cannot purge: vm does not exist"},
		{"in flight", &api.VmRecord{Name: "v", State: api.StateDestroyed, Host: "h1", InFlight: []api.InFlight{{CommandID: "x1", Action: fsm.ActPrepare}}}, "", "has a command in flight (prepare x1)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ev := api.Event{VM: "v", CommandID: "p1", Action: fsm.ActPurge, Issuer: c.issuer}
			err := admission{}.admit(c.rec, fsm.ActPurge, &api.Command{}, &ev)
			if c.want != "" {
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("admit = %v, want a rejection with %q", err, c.want)
				}
				return
			}
			if err != nil {
				t.Fatalf("admit = %v, want accepted", err)
			}
			if ev.Type != api.TypeAccepted || ev.State != api.StateDestroyed || ev.Host != c.rec.Host || ev.Handle != nil || len(events.TasksOf(&ev, 9)) != 0 {
				t.Fatalf("accepted purge %+v", ev)
			}
		})
	}
}

package hosts_test

import (
	"strings"
	"testing"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/hosts"
)

// host is an alive host with a default backend and a capacity.
func host(name string, def api.BackendTag, vcpus, memMB int) *api.Host {
	h := &api.Host{Alive: true}
	h.Heartbeat = api.Heartbeat{Host: name, Backends: []api.BackendTag{def}, DefaultBackend: def,
		Capacity: api.Resources{Vcpus: vcpus, MemoryMB: memMB}}
	return h
}

func placed(m map[string]api.Resources) func(string) api.Resources {
	return func(h string) api.Resources { return m[h] }
}

func counts(m map[string]int) func(string) int { return func(h string) int { return m[h] } }

// Fits says why one host cannot take a VM: lost, cordoned, no such
// backend, at its VM limit, without the image, or short of free vCPUs
// or memory once what is already placed (or reserved) there is taken
// off its capacity. A Noop VM takes no capacity.
func TestFits(t *testing.T) {
	t.Parallel()
	qemu := func(mod func(h *api.Host)) *api.Host {
		h := host("h1", api.BackendQEMU, 8, 8192)
		if mod != nil {
			mod(h)
		}
		return h
	}
	need := api.Resources{Vcpus: 2, MemoryMB: 2048}
	for _, tc := range []struct {
		name string
		h    *api.Host
		p    hosts.Placement
		want string // "" fits; else a part of the reason
	}{
		{"empty host", qemu(nil), hosts.Placement{Need: need}, ""},
		{"exactly full after it", qemu(nil), hosts.Placement{Need: api.Resources{Vcpus: 8, MemoryMB: 8192}}, ""},
		{"lost", qemu(func(h *api.Host) { h.Alive = false }), hosts.Placement{Need: need}, "lost"},
		{"cordoned", qemu(func(h *api.Host) { h.Cordon = &api.Cordon{Reason: "x"} }), hosts.Placement{Need: need}, "cordoned"},
		{"lost wins over cordoned", qemu(func(h *api.Host) { h.Alive = false; h.Cordon = &api.Cordon{} }), hosts.Placement{Need: need}, "lost"},
		{"no such backend", qemu(nil), hosts.Placement{Backend: api.BackendPropolis, Need: need}, "no propolis backend"},
		{"too many vCPUs", qemu(nil), hosts.Placement{Need: api.Resources{Vcpus: 9, MemoryMB: 1}}, "needs 9 vCPUs, 8 of 8 free"},
		{"too much memory", qemu(nil), hosts.Placement{Need: api.Resources{Vcpus: 1, MemoryMB: 8193}}, "needs 8193 MiB memory, 8192 of 8192 free"},
		{"memory placed already", qemu(nil), hosts.Placement{Need: need, Placed: placed(map[string]api.Resources{"h1": {Vcpus: 1, MemoryMB: 7000}})},
			"needs 2048 MiB memory, 1192 of 8192 free"},
		{"vCPUs placed already", qemu(nil), hosts.Placement{Need: need, Placed: placed(map[string]api.Resources{"h1": {Vcpus: 7, MemoryMB: 0}})},
			"needs 2 vCPUs, 1 of 8 free"},
		{"overbooked: free shown as 0", qemu(nil), hosts.Placement{Need: need, Placed: placed(map[string]api.Resources{"h1": {Vcpus: 0, MemoryMB: 9000}})},
			"0 of 8192 free"},
		{"another host's placements do not count", qemu(nil), hosts.Placement{Need: need, Placed: placed(map[string]api.Resources{"h2": {Vcpus: 8, MemoryMB: 8192}})}, ""},
		{"at the VM limit", qemu(nil), hosts.Placement{Need: need, MaxVMs: 3, VMsOn: counts(map[string]int{"h1": 3})}, "full (3 VMs, --max-vms-per-host 3)"},
		{"under the VM limit", qemu(nil), hosts.Placement{Need: need, MaxVMs: 3, VMsOn: counts(map[string]int{"h1": 2})}, ""},
		{"no VM limit", qemu(nil), hosts.Placement{Need: need, VMsOn: counts(map[string]int{"h1": 1000})}, ""},
		{"image missing", qemu(nil), hosts.Placement{Need: need, Image: "deb", HasImage: func(h, n string) bool { return false }}, "no image deb"},
		{"image nowhere known", qemu(nil), hosts.Placement{Need: need, Image: "deb"}, "no image deb"},
		{"image there", qemu(nil), hosts.Placement{Need: need, Image: "deb", HasImage: func(h, n string) bool { return h == "h1" && n == "deb" }}, ""},
		{"noop takes no capacity", host("h1", api.BackendNoop, 0, 0), hosts.Placement{Need: api.Resources{Vcpus: 64, MemoryMB: 1 << 20}}, ""},
		{"noop asked on a qemu host", qemu(func(h *api.Host) { h.Backends = append(h.Backends, api.BackendNoop) }),
			hosts.Placement{Backend: api.BackendNoop, Need: api.Resources{Vcpus: 64, MemoryMB: 1 << 20}}, ""},
		{"the default backend's capacity applies", qemu(func(h *api.Host) { h.Backends = append(h.Backends, api.BackendNoop) }),
			hosts.Placement{Need: api.Resources{Vcpus: 64}}, "needs 64 vCPUs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.p.Fits(tc.h)
			if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
				t.Fatalf("Fits: %q, want %q", got, tc.want)
			}
		})
	}
}

// Best takes the fitting host with the most free memory; on equal free
// memory the one with the fewest VMs, then the first by name; a VM that
// names no backend goes to a real hypervisor's host before a Noop-only
// one. With none fitting, the error says why for each host.
func TestBest(t *testing.T) {
	t.Parallel()
	need := api.Resources{Vcpus: 1, MemoryMB: 1024}
	for _, tc := range []struct {
		name string
		hs   []*api.Host
		p    hosts.Placement
		want string // the host, or "error: <part of the message>"
	}{
		{"most free memory", []*api.Host{host("h1", api.BackendQEMU, 8, 4096), host("h2", api.BackendQEMU, 8, 8192)}, hosts.Placement{Need: need}, "h2"},
		{"most free after placements", []*api.Host{host("h1", api.BackendQEMU, 8, 4096), host("h2", api.BackendQEMU, 8, 8192)},
			hosts.Placement{Need: need, Placed: placed(map[string]api.Resources{"h2": {MemoryMB: 6000}})}, "h1"},
		{"equal: fewest VMs", []*api.Host{host("h1", api.BackendQEMU, 8, 4096), host("h2", api.BackendQEMU, 8, 4096)},
			hosts.Placement{Need: need, VMsOn: counts(map[string]int{"h1": 2, "h2": 1})}, "h2"},
		{"equal: first by name", []*api.Host{host("h2", api.BackendQEMU, 8, 4096), host("h1", api.BackendQEMU, 8, 4096)}, hosts.Placement{Need: need}, "h1"},
		{"noop VMs share equal hosts", []*api.Host{host("h1", api.BackendNoop, 0, 0), host("h2", api.BackendNoop, 0, 0)},
			hosts.Placement{Backend: api.BackendNoop, VMsOn: counts(map[string]int{"h1": 5, "h2": 4})}, "h2"},
		{"a real hypervisor before noop", []*api.Host{host("a", api.BackendNoop, 0, 1<<20), host("b", api.BackendQEMU, 8, 2048)}, hosts.Placement{Need: need}, "b"},
		{"a real hypervisor before noop, either order", []*api.Host{host("b", api.BackendQEMU, 8, 2048), host("a", api.BackendNoop, 0, 1<<20)}, hosts.Placement{Need: need}, "b"},
		{"noop asked: most free", []*api.Host{host("a", api.BackendNoop, 0, 10), host("b", api.BackendNoop, 0, 20)}, hosts.Placement{Backend: api.BackendNoop}, "b"},
		{"skips the lost and cordoned", []*api.Host{
			func() *api.Host { h := host("h1", api.BackendQEMU, 8, 1<<20); h.Alive = false; return h }(),
			func() *api.Host { h := host("h2", api.BackendQEMU, 8, 1<<20); h.Cordon = &api.Cordon{}; return h }(),
			host("h3", api.BackendQEMU, 8, 2048)}, hosts.Placement{Need: need}, "h3"},
		{"none fit", []*api.Host{
			func() *api.Host { h := host("h1", api.BackendQEMU, 8, 8192); h.Alive = false; return h }(),
			host("h2", api.BackendQEMU, 8, 512)}, hosts.Placement{Need: need},
			"error: no host can take it (h1: lost; h2: needs 1024 MiB memory, 512 of 512 free)"},
		{"no hosts", nil, hosts.Placement{Need: need}, "error: no host has heartbeated"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := hosts.Best(tc.hs, tc.p)
			got := ""
			if err != nil {
				got = "error: " + err.Error()
			} else {
				got = h.Host
			}
			if !strings.HasPrefix(got, tc.want) {
				t.Fatalf("Best: %s, want %s", got, tc.want)
			}
		})
	}
}

// What a heartbeat tells of a host's backends and task consumer.
func TestHeartbeatFacts(t *testing.T) {
	t.Parallel()
	hb := api.Heartbeat{
		Backends:     []api.BackendTag{api.BackendQEMU, api.BackendNoop},
		Capabilities: map[api.BackendTag]api.Capabilities{api.BackendQEMU: {Suspend: true, Resume: true}},
	}
	for _, tc := range []struct {
		b    api.BackendTag
		a    fsm.Action
		want bool
	}{
		{api.BackendQEMU, fsm.ActSuspend, true},
		{api.BackendQEMU, fsm.ActResume, true},
		{api.BackendQEMU, fsm.ActMigrate, false},
		{api.BackendQEMU, fsm.ActStart, true},
		{api.BackendNoop, fsm.ActMigrate, true}, // no capabilities said: not refused here
	} {
		if got := hb.Can(tc.b, tc.a); got != tc.want {
			t.Errorf("Can(%s, %s) = %v, want %v", tc.b, tc.a, got, tc.want)
		}
	}
	if !hb.Has(api.BackendNoop) || hb.Has(api.BackendPropolis) {
		t.Error("Has")
	}
	var ts api.TaskSettings
	if ts.AckWait().Seconds() != 30 || ts.Pending() != 256 {
		t.Errorf("defaults: ack wait %s, pending %d", ts.AckWait(), ts.Pending())
	}
	ts = api.TaskSettings{AckWaitMS: 1500, MaxAckPending: 8}
	if ts.AckWait().Milliseconds() != 1500 || ts.Pending() != 8 {
		t.Errorf("set: ack wait %s, pending %d", ts.AckWait(), ts.Pending())
	}
	if got := (api.Resources{Vcpus: 1, MemoryMB: 2}).Add(api.Resources{Vcpus: 3, MemoryMB: 4}); got != (api.Resources{Vcpus: 4, MemoryMB: 6}) {
		t.Errorf("Add: %+v", got)
	}
}

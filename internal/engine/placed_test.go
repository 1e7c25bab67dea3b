package engine

import (
	"reflect"
	"testing"

	"github.com/vmherd/vmherd/api"
)

func TestPlacedCount(t *testing.T) {
	c := newPlacedCount(nil)
	rec := func(name, host string, state api.VmState, b api.BackendTag, seq uint64) *api.VmRecord {
		return &api.VmRecord{Name: name, Host: host, State: state, Backend: b, Vcpus: 2, MemoryMB: 512, LastSeq: seq}
	}
	c.observe(rec("a", "h1", api.StateRunning, api.BackendQEMU, 5))
	c.observe(rec("b", "h1", api.StateStopped, api.BackendQEMU, 6))
	c.observe(rec("n", "h1", api.StateRunning, api.BackendNoop, 7)) // Noop takes nothing
	if got := c.on("h1"); got != (api.Resources{Vcpus: 4, MemoryMB: 1024}) {
		t.Fatalf("h1: %+v", got)
	}
	// An older record (the bucket read at start, after a fold) changes nothing.
	c.observe(rec("a", "h1", api.StateDestroyed, api.BackendQEMU, 4))
	if got := c.on("h1"); got.MemoryMB != 1024 {
		t.Fatalf("an older record counted: %+v", got)
	}
	c.observe(rec("a", "h1", api.StateDestroyed, api.BackendQEMU, 8))
	c.observe(rec("b", "h2", api.StatePreparing, api.BackendQEMU, 9)) // prepared again elsewhere
	if got := c.on("h1"); got != (api.Resources{}) {
		t.Fatalf("h1 after destroy and move: %+v", got)
	}
	if got := c.on("h2"); got != (api.Resources{Vcpus: 2, MemoryMB: 512}) {
		t.Fatalf("h2: %+v", got)
	}
	if got := c.vmsOn("h1"); !reflect.DeepEqual(got, []string{"n"}) {
		t.Fatalf("vms on h1: %v", got)
	}
	// A failed prepare (no handle) takes no room; a failed start (a
	// handle) keeps its room (issue #22, item 8).
	c.observe(rec("f", "h3", api.StatePreparing, api.BackendQEMU, 10))
	c.observe(rec("f", "h3", api.StateFailed, api.BackendQEMU, 11))
	if got := c.on("h3"); got != (api.Resources{}) {
		t.Fatalf("h3 after a failed prepare: %+v", got)
	}
	if got := c.onHost("h3"); got != 1 {
		t.Fatalf("a failed prepare is still a VM on h3 until destroyed: %d", got)
	}
	started := rec("s", "h3", api.StateFailed, api.BackendQEMU, 12)
	started.Handle = &api.VmHandle{ID: "i1", Name: "s"}
	c.observe(started)
	if got := c.on("h3"); got != (api.Resources{Vcpus: 2, MemoryMB: 512}) {
		t.Fatalf("h3 with a failed start: %+v", got)
	}
}

// A placement counts from its reserve until a record of the VM past the
// one it was decided on is folded; then the record counts instead.
func TestPlacedCountReserve(t *testing.T) {
	c := newPlacedCount(nil)
	c.observe(&api.VmRecord{Name: "a", Host: "h1", State: api.StateRunning, Backend: api.BackendQEMU, Vcpus: 1, MemoryMB: 100, LastSeq: 3})
	c.reserve("b", "h1", api.BackendQEMU, api.Resources{Vcpus: 2, MemoryMB: 512}, 0)
	c.reserve("n", "h1", api.BackendNoop, api.Resources{Vcpus: 2, MemoryMB: 512}, 4) // Noop takes nothing
	if got, n := c.on("h1"), c.onHost("h1"); got != (api.Resources{Vcpus: 3, MemoryMB: 612}) || n != 3 {
		t.Fatalf("h1 with two unfolded placements: %+v, %d VMs", got, n)
	}
	if n := c.withPrefix("b"); n != 1 {
		t.Fatalf("prefix b: %d", n)
	}
	// b's decision folded: counted once, from its record.
	c.observe(&api.VmRecord{Name: "b", Host: "h1", State: api.StatePreparing, Backend: api.BackendQEMU, Vcpus: 2, MemoryMB: 512, LastSeq: 5})
	// An older record of n (its destroy, folded late) leaves n's placement.
	c.observe(&api.VmRecord{Name: "n", State: api.StateDestroyed, LastSeq: 4})
	if got, n := c.on("h1"), c.onHost("h1"); got != (api.Resources{Vcpus: 3, MemoryMB: 612}) || n != 3 {
		t.Fatalf("h1 after b's fold: %+v, %d VMs", got, n)
	}
	c.observe(&api.VmRecord{Name: "n", Host: "h1", State: api.StatePreparing, Backend: api.BackendNoop, LastSeq: 6})
	if n := c.onHost("h1"); n != 3 || len(c.pending) != 0 {
		t.Fatalf("after every fold: %d VMs on h1, %d unfolded", n, len(c.pending))
	}
}

package engine

import (
	"reflect"
	"testing"

	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/vm"
)

func TestPlacedCount(t *testing.T) {
	c := newPlacedCount(nil)
	rec := func(name, host string, state vm.VmState, b vm.BackendTag, seq uint64) *projection.VmRecord {
		return &projection.VmRecord{Name: name, Host: host, State: state, Backend: b, Vcpus: 2, MemoryMB: 512, LastSeq: seq}
	}
	c.observe(rec("a", "h1", vm.StateRunning, vm.BackendQEMU, 5))
	c.observe(rec("b", "h1", vm.StateStopped, vm.BackendQEMU, 6))
	c.observe(rec("n", "h1", vm.StateRunning, vm.BackendNoop, 7)) // Noop takes nothing
	if got := c.on("h1"); got != (hosts.Resources{Vcpus: 4, MemoryMB: 1024}) {
		t.Fatalf("h1: %+v", got)
	}
	// An older record (the bucket read at start, after a fold) changes nothing.
	c.observe(rec("a", "h1", vm.StateDestroyed, vm.BackendQEMU, 4))
	if got := c.on("h1"); got.MemoryMB != 1024 {
		t.Fatalf("an older record counted: %+v", got)
	}
	c.observe(rec("a", "h1", vm.StateDestroyed, vm.BackendQEMU, 8))
	c.observe(rec("b", "h2", vm.StatePreparing, vm.BackendQEMU, 9)) // prepared again elsewhere
	if got := c.on("h1"); got != (hosts.Resources{}) {
		t.Fatalf("h1 after destroy and move: %+v", got)
	}
	if got := c.on("h2"); got != (hosts.Resources{Vcpus: 2, MemoryMB: 512}) {
		t.Fatalf("h2: %+v", got)
	}
	if got := c.vmsOn("h1"); !reflect.DeepEqual(got, []string{"n"}) {
		t.Fatalf("vms on h1: %v", got)
	}
	// A failed prepare (no handle) takes no room; a failed start (a
	// handle) keeps its room (issue #22, item 8).
	c.observe(rec("f", "h3", vm.StatePreparing, vm.BackendQEMU, 10))
	c.observe(rec("f", "h3", vm.StateFailed, vm.BackendQEMU, 11))
	if got := c.on("h3"); got != (hosts.Resources{}) {
		t.Fatalf("h3 after a failed prepare: %+v", got)
	}
	if got := c.onHost("h3"); got != 1 {
		t.Fatalf("a failed prepare is still a VM on h3 until destroyed: %d", got)
	}
	started := rec("s", "h3", vm.StateFailed, vm.BackendQEMU, 12)
	started.Handle = &vm.VmHandle{ID: "i1", Name: "s"}
	c.observe(started)
	if got := c.on("h3"); got != (hosts.Resources{Vcpus: 2, MemoryMB: 512}) {
		t.Fatalf("h3 with a failed start: %+v", got)
	}
}

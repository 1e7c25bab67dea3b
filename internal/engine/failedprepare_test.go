package engine_test

import (
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/testenv"
)

// A prepare that failed on its host reserves nothing there: the next VM
// that needs the room is placed (issue #22, item 8). The worker's "qemu"
// is a Noop backend with no image root, so every prepare fails on its
// image path, after placement counted it.
func TestFailedPrepareFreesItsRoom(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1", MemoryMB: 1024,
		Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: noop.New(noop.Options{})}})
	env.WaitHost(eng, "h1")
	spec := func() *api.VmSpec {
		return &api.VmSpec{Backend: api.BackendQEMU, ImagePath: "/nowhere/disk.qcow2", MemoryMB: 768}
	}
	// A first incarnation whose prepare fails.
	env.SendCmd("big0", "prepare", "p0", api.Command{Spec: spec()})
	if ev := env.Result("big0", "p0", 10*time.Second); ev.Type != api.TypeFailed {
		t.Fatalf("big0's prepare: %+v", ev)
	}
	// A second incarnation whose prepare fails: its failed result must not
	// carry the first incarnation's handle (the record would take it for
	// this one's, and count its room).
	env.SendCmd("big1", "prepare", "n1", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("big1", "n1", 10*time.Second)
	env.SendCmd("big1", "destroy", "d1", api.Command{})
	env.Result("big1", "d1", 10*time.Second)
	env.SendCmd("big1", "prepare", "p1", api.Command{Spec: spec()})
	if ev := env.Result("big1", "p1", 10*time.Second); ev.Type != api.TypeFailed || ev.Handle != nil {
		t.Fatalf("big1's second prepare: %+v", ev)
	}
	env.CheckProjection(10 * time.Second)
	env.SendCmd("big2", "prepare", "p2", api.Command{Spec: spec()})
	if ev := env.Decision("big2", "p2", 10*time.Second); ev.Type != api.TypeAccepted {
		t.Fatalf("big2 after big0's and big1's prepares failed: %s %s", ev.Type, ev.Reason)
	}
}

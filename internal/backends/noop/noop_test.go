package noop_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/conformance"
	"github.com/vmherd/vmherd/internal/backends/noop"
)

func TestConformance(t *testing.T) {
	conformance.Run(t, conformance.Config{
		New: func(t *testing.T) backends.Hypervisor { return noop.New(noop.Options{}) },
		Spec: func(t *testing.T, name string) api.VmSpec {
			return api.VmSpec{Name: name, Backend: api.BackendNoop}.WithDefaults()
		},
	})
}

func TestInjectedFailureHasNoEffect(t *testing.T) {
	b := noop.New(noop.Options{})
	ctx := context.Background()
	h, err := b.Prepare(ctx, api.VmSpec{Name: "f1"})
	if err != nil {
		t.Fatal(err)
	}
	b.FailNext(noop.CallStart, 1)
	if _, err := b.Start(ctx, h); !errors.Is(err, backends.ErrInjected) {
		t.Fatalf("Start = %v, want ErrInjected", err)
	}
	if st, _ := b.State(ctx, h); st != api.StatePrepared {
		t.Fatalf("state after failed start = %s, want prepared", st)
	}
	if _, err := b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	if got := b.Effects(noop.CallStart); got != 1 {
		t.Fatalf("start effects = %d, want 1", got)
	}
}

func TestLatencyRespectsContext(t *testing.T) {
	b := noop.New(noop.Options{CallLatency: map[string]time.Duration{noop.CallStart: time.Hour}})
	h, err := b.Prepare(context.Background(), api.VmSpec{Name: "slow"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := b.Start(ctx, h); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start = %v, want deadline exceeded", err)
	}
	if st, _ := b.State(context.Background(), h); st != api.StatePrepared {
		t.Fatalf("state = %s, want prepared", st)
	}
}

func TestCrashIsWatched(t *testing.T) {
	b := noop.New(noop.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := b.Watch(ctx)
	h, _ := b.Prepare(ctx, api.VmSpec{Name: "c1"})
	h, _ = b.Start(ctx, h)
	if !b.Crash("c1", "test crash") {
		t.Fatal("Crash returned false for a running VM")
	}
	select {
	case e := <-w:
		if e.Handle.ID != h.ID || e.Handle.PID != h.PID || e.Reason != "test crash" {
			t.Fatalf("exit = %+v, want handle %s pid %d", e, h.ID, h.PID)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no exit observed")
	}
	if st, _ := b.State(ctx, h); st != api.StateStopped {
		t.Fatalf("state after crash = %s", st)
	}
}

func TestConformanceStateDir(t *testing.T) {
	dir := t.TempDir()
	conformance.Run(t, conformance.Config{
		New: func(t *testing.T) backends.Hypervisor { return noop.New(noop.Options{StateDir: dir}) },
		Spec: func(t *testing.T, name string) api.VmSpec {
			return api.VmSpec{Name: name, Backend: api.BackendNoop}.WithDefaults()
		},
	})
}

// Two backends on one state dir (two worker processes on one host) see
// the same VMs, and a new one after a crash still knows them.
func TestStateDirShared(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	a, b := noop.New(noop.Options{StateDir: dir}), noop.New(noop.Options{StateDir: dir})
	h, err := a.Prepare(ctx, api.VmSpec{Name: "shared"})
	if err != nil {
		t.Fatal(err)
	}
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	if st, _ := a.State(ctx, h); st != api.StateRunning {
		t.Fatalf("state seen by the other backend = %s", st)
	}
	c := noop.New(noop.Options{StateDir: dir})
	if st, _ := c.State(ctx, h); st != api.StateRunning {
		t.Fatalf("state after restart = %s", st)
	}
}

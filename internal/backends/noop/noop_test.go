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

// TestStatsSimulated: the Noop backend's counters are simulated, growing
// at fixed rates with the time the VM has run: not while it is
// suspended, from zero again after a restart, and the same as seen by
// every backend on a shared state dir.
func TestStatsSimulated(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	b := noop.New(noop.Options{StateDir: dir})
	h, err := b.Prepare(ctx, api.VmSpec{Name: "s1", Vcpus: 2, MemoryMB: 64})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Stats(ctx, h); !errors.Is(err, backends.ErrNotRunning) {
		t.Fatalf("Stats of a prepared VM = %v, want ErrNotRunning", err)
	}
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	s1, err := b.Stats(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	if !s1.Simulated || s1.State != api.StateRunning || len(s1.Vcpus) != 2 || s1.MemoryBytes != 64<<20 ||
		s1.RSSBytes < 32<<20 || s1.RSSBytes > 64<<20 || !s1.StartedAt.Equal(h.StartedAt) ||
		len(s1.Disks) != 1 || s1.Disks[0].Device != noop.SimulatedDisk || len(s1.Nets) != 1 || s1.Nets[0].Name != noop.SimulatedNIC {
		t.Fatalf("Stats = %+v", s1)
	}
	// Two vCPUs each a fifth busy: 0.4 s of CPU per second run.
	ran := s1.Time.Sub(s1.StartedAt)
	if got, want := s1.CPUTime.Seconds(), 0.4*ran.Seconds(); got < want*0.9 || got > want*1.1 {
		t.Errorf("cpu time %.3fs after %s, want about %.3fs", got, ran, want)
	}
	if got, want := float64(s1.Disks[0].WrBytes), 16384*ran.Seconds(); got < want*0.9 || got > want*1.1 {
		t.Errorf("disk written %.0f bytes after %s, want about %.0f", got, ran, want)
	}
	// Another backend on the same state dir sees the same VM run.
	s2, err := noop.New(noop.Options{StateDir: dir}).Stats(ctx, h)
	if err != nil || s2.CPUTime < s1.CPUTime || s2.Disks[0].WrBytes < s1.Disks[0].WrBytes {
		t.Fatalf("Stats from a second backend = %+v, %v; first %+v", s2, err, s1)
	}
	// Suspended: the counters stand still.
	if h, err = b.Suspend(ctx, h); err != nil {
		t.Fatal(err)
	}
	a, _ := b.Stats(ctx, h)
	time.Sleep(100 * time.Millisecond)
	c, _ := b.Stats(ctx, h)
	if a.State != api.StateSuspended || c.CPUTime != a.CPUTime || c.Disks[0] != a.Disks[0] || a.CPUTime < s2.CPUTime {
		t.Fatalf("suspended: %+v then %+v", a, c)
	}
	// Resumed, they go on from there.
	if h, err = b.Resume(ctx, h); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if r, _ := b.Stats(ctx, h); r.CPUTime <= c.CPUTime {
		t.Fatalf("resumed: cpu %s, was %s", r.CPUTime, c.CPUTime)
	}
	// A restart is a new process: its counters start again.
	if h, err = b.Stop(ctx, h, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Stats(ctx, h); !errors.Is(err, backends.ErrNotRunning) {
		t.Fatalf("Stats of a stopped VM = %v, want ErrNotRunning", err)
	}
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	if r, _ := b.Stats(ctx, h); r.CPUTime >= c.CPUTime {
		t.Fatalf("after a restart cpu %s, want less than the old process's %s", r.CPUTime, c.CPUTime)
	}
}

// Package conformance is the test suite every Hypervisor implementation
// runs: the same lifecycle, the same idempotency rules, the same answers.
package conformance

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

// Config describes the backend under test.
type Config struct {
	// New returns the backend, ready to use.
	New func(t *testing.T) backends.Hypervisor
	// Spec returns a spec for a VM with the given name that the backend can run.
	Spec func(t *testing.T, name string) api.VmSpec
	// NoSuspend: the backend cannot suspend/resume and must say so with
	// backends.ErrUnsupported.
	NoSuspend bool
	// StopTimeout is passed to Stop (default 10s).
	StopTimeout time.Duration
	// CallTimeout bounds each call (default 2 minutes).
	CallTimeout time.Duration
	// ConsoleKind is the console kind the backend returns.
	ConsoleKind api.ConsoleKind
	// Serial runs the sub-tests one after another (slow real backends).
	Serial bool
}

var seq atomic.Int64

// Run runs the suite.
func Run(t *testing.T, c Config) {
	if c.StopTimeout == 0 {
		c.StopTimeout = 10 * time.Second
	}
	if c.CallTimeout == 0 {
		c.CallTimeout = 2 * time.Minute
	}
	h := c.New(t)
	name := func(base string) string { return fmt.Sprintf("conf-%s-%d", base, seq.Add(1)) }
	ctx := func(t *testing.T) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), c.CallTimeout)
		t.Cleanup(cancel)
		return ctx
	}
	par := func(t *testing.T) {
		if !c.Serial {
			t.Parallel()
		}
	}
	wantState := func(t *testing.T, hd api.VmHandle, want api.VmState) {
		t.Helper()
		got, err := h.State(ctx(t), hd)
		if err != nil {
			t.Fatalf("State(%s): %v", hd.Name, err)
		}
		if got != want {
			t.Fatalf("State(%s) = %s, want %s", hd.Name, got, want)
		}
	}

	t.Run("Lifecycle", func(t *testing.T) {
		par(t)
		n := name("life")
		hd, err := h.Prepare(ctx(t), c.Spec(t, n))
		if err != nil {
			t.Fatalf("Prepare: %v", err)
		}
		t.Cleanup(func() { _ = h.Destroy(context.Background(), hd) })
		if hd.ID == "" || hd.Name != n || hd.Backend == "" {
			t.Fatalf("Prepare returned an incomplete handle %+v", hd)
		}
		wantState(t, hd, api.StatePrepared)
		hd, err = h.Start(ctx(t), hd)
		if err != nil {
			t.Fatalf("Start: %v", err)
		}
		wantState(t, hd, api.StateRunning)
		if !c.NoSuspend {
			if hd, err = h.Suspend(ctx(t), hd); err != nil {
				t.Fatalf("Suspend: %v", err)
			}
			wantState(t, hd, api.StateSuspended)
			if hd, err = h.Resume(ctx(t), hd); err != nil {
				t.Fatalf("Resume: %v", err)
			}
			wantState(t, hd, api.StateRunning)
		}
		if hd, err = h.Stop(ctx(t), hd, c.StopTimeout); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		wantState(t, hd, api.StateStopped)
		if hd, err = h.Start(ctx(t), hd); err != nil {
			t.Fatalf("second Start: %v", err)
		}
		wantState(t, hd, api.StateRunning)
		if err := h.Destroy(ctx(t), hd); err != nil {
			t.Fatalf("Destroy: %v", err)
		}
		if st, err := h.State(ctx(t), hd); err == nil && st != api.StateDestroyed {
			t.Fatalf("State after Destroy = %s, want an error or destroyed", st)
		}
	})

	t.Run("Idempotent", func(t *testing.T) {
		par(t)
		n := name("idem")
		spec := c.Spec(t, n)
		h1, err := h.Prepare(ctx(t), spec)
		if err != nil {
			t.Fatalf("Prepare: %v", err)
		}
		t.Cleanup(func() { _ = h.Destroy(context.Background(), h1) })
		h2, err := h.Prepare(ctx(t), spec)
		if err != nil {
			t.Fatalf("second Prepare: %v", err)
		}
		if h1.ID != h2.ID {
			t.Fatalf("second Prepare made a new VM: %s != %s", h1.ID, h2.ID)
		}
		s1, err := h.Start(ctx(t), h1)
		if err != nil {
			t.Fatalf("Start: %v", err)
		}
		s2, err := h.Start(ctx(t), s1)
		if err != nil {
			t.Fatalf("second Start: %v", err)
		}
		if s1.PID != s2.PID || s1.ID != s2.ID {
			t.Fatalf("second Start made a new VM: pid %d -> %d, id %s -> %s", s1.PID, s2.PID, s1.ID, s2.ID)
		}
		wantState(t, s2, api.StateRunning)
		if !c.NoSuspend {
			p1, err := h.Suspend(ctx(t), s2)
			if err != nil {
				t.Fatalf("Suspend: %v", err)
			}
			if _, err := h.Suspend(ctx(t), p1); err != nil {
				t.Fatalf("second Suspend: %v", err)
			}
			wantState(t, p1, api.StateSuspended)
			r1, err := h.Resume(ctx(t), p1)
			if err != nil {
				t.Fatalf("Resume: %v", err)
			}
			if _, err := h.Resume(ctx(t), r1); err != nil {
				t.Fatalf("second Resume: %v", err)
			}
			wantState(t, r1, api.StateRunning)
		}
		st1, err := h.Stop(ctx(t), s2, c.StopTimeout)
		if err != nil {
			t.Fatalf("Stop: %v", err)
		}
		if _, err := h.Stop(ctx(t), st1, c.StopTimeout); err != nil {
			t.Fatalf("second Stop: %v", err)
		}
		wantState(t, st1, api.StateStopped)
		if err := h.Destroy(ctx(t), st1); err != nil {
			t.Fatalf("Destroy: %v", err)
		}
		if err := h.Destroy(ctx(t), st1); err != nil {
			t.Fatalf("second Destroy: %v", err)
		}
	})

	t.Run("DestroyRunning", func(t *testing.T) {
		par(t)
		n := name("drun")
		hd, err := h.Prepare(ctx(t), c.Spec(t, n))
		if err != nil {
			t.Fatalf("Prepare: %v", err)
		}
		if hd, err = h.Start(ctx(t), hd); err != nil {
			t.Fatalf("Start: %v", err)
		}
		if err := h.Destroy(ctx(t), hd); err != nil {
			t.Fatalf("Destroy of a running VM: %v", err)
		}
		if st, err := h.State(ctx(t), hd); err == nil && st != api.StateDestroyed {
			t.Fatalf("State after Destroy = %s, want an error or destroyed", st)
		}
		// The name can be used again, for a new incarnation.
		h2, err := h.Prepare(ctx(t), c.Spec(t, n))
		if err != nil {
			t.Fatalf("Prepare after Destroy: %v", err)
		}
		t.Cleanup(func() { _ = h.Destroy(context.Background(), h2) })
		if h2.ID == hd.ID {
			t.Fatalf("re-created VM kept the old handle id %s", h2.ID)
		}
		wantState(t, h2, api.StatePrepared)
	})

	t.Run("Unsupported", func(t *testing.T) {
		if !c.NoSuspend {
			t.Skip("backend supports suspend/resume")
		}
		par(t)
		n := name("unsup")
		hd, err := h.Prepare(ctx(t), c.Spec(t, n))
		if err != nil {
			t.Fatalf("Prepare: %v", err)
		}
		t.Cleanup(func() { _ = h.Destroy(context.Background(), hd) })
		if _, err := h.Suspend(ctx(t), hd); !errors.Is(err, backends.ErrUnsupported) {
			t.Fatalf("Suspend = %v, want ErrUnsupported", err)
		}
		if _, err := h.Resume(ctx(t), hd); !errors.Is(err, backends.ErrUnsupported) {
			t.Fatalf("Resume = %v, want ErrUnsupported", err)
		}
		if caps := backends.CapabilitiesOf(h); caps.Suspend || caps.Resume {
			t.Fatalf("Capabilities = %+v, want no suspend/resume", caps)
		}
	})

	t.Run("Console", func(t *testing.T) {
		par(t)
		n := name("cons")
		hd, err := h.Prepare(ctx(t), c.Spec(t, n))
		if err != nil {
			t.Fatalf("Prepare: %v", err)
		}
		t.Cleanup(func() { _ = h.Destroy(context.Background(), hd) })
		ep, err := h.ConsoleEndpoint(hd)
		if err != nil {
			t.Fatalf("ConsoleEndpoint: %v", err)
		}
		want := c.ConsoleKind
		if want == "" {
			want = api.ConsoleNone
		}
		if ep.Kind != want {
			t.Fatalf("ConsoleEndpoint kind = %s, want %s", ep.Kind, want)
		}
		switch ep.Kind {
		case api.ConsoleUnixSocket:
			if ep.Path == "" {
				t.Fatal("unix-socket console without a path")
			}
		case api.ConsoleWebSocket:
			if ep.URL == "" {
				t.Fatal("websocket console without a URL")
			}
		}
	})

	t.Run("UnknownHandle", func(t *testing.T) {
		par(t)
		ghost := api.VmHandle{ID: "does-not-exist", Name: name("ghost"), Backend: c.Spec(t, "x").Backend}
		if _, err := h.Start(ctx(t), ghost); err == nil {
			t.Fatal("Start of a VM that was never prepared succeeded")
		}
		if err := h.Destroy(ctx(t), ghost); err != nil {
			t.Fatalf("Destroy of an unknown VM must be a no-op, got %v", err)
		}
	})
}

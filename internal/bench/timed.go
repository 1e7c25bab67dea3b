package bench

import (
	"context"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

// timed wraps the QEMU backend in the worker and records how long its
// last call of each kind took, so figure 5 can split vmherd's added time
// into the backend's share and the pipeline's (NATS, engine, worker).
type timed struct {
	b backends.Hypervisor

	mu   sync.Mutex
	last map[string]time.Duration
}

var (
	_ backends.Hypervisor = (*timed)(nil)
	_ backends.Watcher    = (*timed)(nil)
	_ backends.Adopter    = (*timed)(nil)
	_ backends.Capable    = (*timed)(nil)
)

func newTimed(b backends.Hypervisor) *timed { return &timed{b: b, last: map[string]time.Duration{}} }

func (t *timed) took(call string, start time.Time) {
	d := time.Since(start)
	t.mu.Lock()
	t.last[call] = d
	t.mu.Unlock()
}

// Last is the duration of the last call of a kind.
func (t *timed) Last(call string) time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.last[call]
}

func (t *timed) Prepare(ctx context.Context, spec api.VmSpec) (api.VmHandle, error) {
	defer t.took("prepare", time.Now())
	return t.b.Prepare(ctx, spec)
}

func (t *timed) Start(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	defer t.took("start", time.Now())
	return t.b.Start(ctx, h)
}

func (t *timed) Stop(ctx context.Context, h api.VmHandle, timeout time.Duration) (api.VmHandle, error) {
	defer t.took("stop", time.Now())
	return t.b.Stop(ctx, h, timeout)
}

func (t *timed) Suspend(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	defer t.took("suspend", time.Now())
	return t.b.Suspend(ctx, h)
}

func (t *timed) Resume(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	defer t.took("resume", time.Now())
	return t.b.Resume(ctx, h)
}

func (t *timed) Destroy(ctx context.Context, h api.VmHandle) error {
	defer t.took("destroy", time.Now())
	return t.b.Destroy(ctx, h)
}

func (t *timed) State(ctx context.Context, h api.VmHandle) (api.VmState, error) {
	return t.b.State(ctx, h)
}

func (t *timed) GuestIP(ctx context.Context, h api.VmHandle) (string, error) {
	return t.b.GuestIP(ctx, h)
}

func (t *timed) ConsoleEndpoint(h api.VmHandle) (api.ConsoleEndpoint, error) {
	return t.b.ConsoleEndpoint(h)
}

func (t *timed) Watch(ctx context.Context) <-chan backends.Exit {
	if w, ok := t.b.(backends.Watcher); ok {
		return w.Watch(ctx)
	}
	ch := make(chan backends.Exit)
	go func() { <-ctx.Done(); close(ch) }()
	return ch
}

func (t *timed) Adopt(ctx context.Context, h api.VmHandle, recorded api.VmState) (api.VmHandle, api.VmState, error) {
	if a, ok := t.b.(backends.Adopter); ok {
		return a.Adopt(ctx, h, recorded)
	}
	st, err := t.b.State(ctx, h)
	return h, st, err
}

func (t *timed) Capabilities() api.Capabilities { return backends.CapabilitiesOf(t.b) }

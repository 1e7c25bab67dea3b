package noop

import (
	"context"
	"fmt"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

// CallMigrate is a live send or a cold copy (its latency is the copy's).
const CallMigrate = "migrate"

// stateIncoming marks a copy received from another host that waits for
// the switch.
const stateIncoming api.VmState = "incoming"

var _ backends.Migrator = (*Backend)(nil)

// Receive makes a paused copy of src here, under a handle of its own.
func (b *Backend) Receive(_ context.Context, src api.VmHandle, _ string, r backends.Receiving) (api.VmHandle, string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if e, ok := b.get(src.Name); ok {
		if e.State == stateIncoming {
			return e.H.Clone(), "noop:" + e.H.ID, nil
		}
		return api.VmHandle{}, "", fmt.Errorf("noop: this host already has a vm %s (%s); it cannot take another", src.Name, e.State)
	}
	h := src.Clone()
	h.ID = newID()
	h.PID = 0
	b.put(h.Name, &entry{H: h, State: stateIncoming, Effects: b.tombstoneEffects(h.Name)})
	return h.Clone(), "noop:" + h.ID, nil
}

// Send waits the migrate latency, reporting progress.
func (b *Backend) Send(ctx context.Context, h api.VmHandle, _ string, _ backends.SendOptions, progress func(backends.MigrationProgress)) (backends.MigrationProgress, error) {
	b.mu.Lock()
	_, err := b.lookup(h)
	b.mu.Unlock()
	if err != nil {
		return backends.MigrationProgress{}, err
	}
	progress(backends.MigrationProgress{Phase: "copying", Total: 1 << 20})
	if err := b.delay(ctx, CallMigrate); err != nil {
		return backends.MigrationProgress{}, err
	}
	return backends.MigrationProgress{Phase: "switchover", Bytes: 1 << 20, Total: 1 << 20}, nil
}

// Export and Unexport serve nothing: the copy is simulated.
func (b *Backend) Export(ctx context.Context, h api.VmHandle, _ backends.Receiving) (string, int64, string, error) {
	b.mu.Lock()
	_, err := b.lookup(h)
	b.mu.Unlock()
	return "noop:" + h.ID, 0, "", err
}

func (b *Backend) Unexport(context.Context, api.VmHandle) error { return nil }

// Activate makes the copy the VM, in state before.
func (b *Backend) Activate(_ context.Context, h api.VmHandle, before api.VmState) (api.VmHandle, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	e, err := b.lookup(h)
	if err != nil {
		return h, err
	}
	if e.State == stateIncoming {
		e.State = before
		if before == api.StateRunning || before == api.StateSuspended {
			b.nextPID++
			e.H.PID = 1000 + b.nextPID%(1<<22)
			e.H.StartedAt = time.Now().UTC()
		}
		b.effect(e, CallMigrate)
		b.put(h.Name, e)
	}
	return e.H.Clone(), nil
}

// Abandon removes a copy that waits (never a VM that is not one).
func (b *Backend) Abandon(_ context.Context, h api.VmHandle) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if e, ok := b.get(h.Name); ok && e.State == stateIncoming {
		b.del(h.Name, e)
	}
	return nil
}

// Recover leaves the source's VM as it is: a Noop send changes nothing.
func (b *Backend) Recover(_ context.Context, h api.VmHandle, _ api.VmState) (api.VmHandle, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	e, err := b.lookup(h)
	if err != nil {
		return h, err
	}
	return e.H.Clone(), nil
}

package engine

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
)

// purgedAt is when the VM's purge was stored, if its first event left is
// a purge (an accepted purge removes the VM's events before it); zero
// otherwise.
func (e *Engine) purgedAt(ctx context.Context, name string) (time.Time, error) {
	m, err := e.store.Stream().GetMsg(ctx, 1, jetstream.WithGetMsgSubject(e.cfg.Names.VMEvents(name)))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("reading the first event of vm %s: %w", name, err)
	}
	ev, err := events.DecodeStored(e.cfg.Names, m.Subject, m.Data)
	if err != nil || events.RelayedCopy(m) || ev.Type != api.TypeAccepted || ev.Action != api.ActPurge {
		return time.Time{}, nil
	}
	return m.Time, nil
}

// finishPurges is the safety net under a purge's removal of its VM's
// earlier events (purged), which an engine does after storing the
// decision: one that died in between left them, and no command or look
// of the retention comes back to a VM whose record is gone. At start-up,
// once the projection has folded what was stored before (requeueInFlight
// waits for that), every name whose record is deleted (a purge's fold) and
// whose first event left is not its purge has the removal done again.
func (e *Engine) finishPurges(ctx context.Context) error {
	names, err := events.KVDeleted(ctx, e.cfg.JS, e.cfg.Names.RecordsBucket(), "")
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		e.log.Warn("checking purged vms at start-up failed", "err", err)
		return nil
	}
	finished := 0
	for _, name := range names {
		if api.ValidateName(name) != nil {
			continue
		}
		done, err := e.finishPurge(ctx, name)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			e.log.Warn("finishing a purge at start-up failed", "vm", name, "err", err)
			continue
		}
		if done {
			finished++
		}
	}
	e.log.Info("checked the purged vms at start-up", "vms", len(names), "purges_finished", finished)
	return nil
}

// finishPurge removes the events of name stored before its purge, if its
// first event left is not the purge; it reports whether it did. The last
// decision accepted for a VM without a record is its purge.
func (e *Engine) finishPurge(ctx context.Context, name string) (bool, error) {
	at, err := e.purgedAt(ctx, name)
	if err != nil || !at.IsZero() {
		return false, err
	}
	m, err := e.store.Stream().GetLastMsgForSubject(ctx, e.cfg.Names.Event(name, api.TypeAccepted, api.EngineWriter))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading the last decision of vm %s: %w", name, err)
	}
	ev, err := events.DecodeStored(e.cfg.Names, m.Subject, m.Data)
	if err != nil || events.RelayedCopy(m) || ev.Action != api.ActPurge {
		return false, nil
	}
	if err := e.purged(ctx, ev, events.StoredSeq(m)); err != nil {
		return false, err
	}
	return true, nil
}

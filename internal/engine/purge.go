package engine

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
)

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

// finishPurge removes the events of name stored before its latest purge,
// if some are left; it reports whether it did.
func (e *Engine) finishPurge(ctx context.Context, name string) (bool, error) {
	st := e.store.Stream()
	pg, ok, err := events.LastPurge(ctx, st, e.cfg.Names, name)
	if err != nil || !ok {
		return false, err
	}
	first, err := st.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(e.cfg.Names.VMEvents(name)))
	if err != nil {
		return false, fmt.Errorf("reading the first event of vm %s: %w", name, err)
	}
	if events.StoredSeq(first) >= pg.Seq {
		return false, nil // done
	}
	ev := &api.Event{VM: name, CommandID: "(finished at start-up)"}
	if err := e.purged(ctx, ev, pg.Seq); err != nil {
		return false, err
	}
	return true, nil
}

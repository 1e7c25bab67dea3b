package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
)

// requeueInFlight is the safety net under the command redelivery that
// queues a decided command's task (decide, follow): at start-up, once the
// projection has folded every event stored before it, each command the
// records show in flight (accepted, no result) whose task is not in the
// tasks stream has its task queued again. It needs nothing of what a
// consumer remembers of its deliveries, which a server that died with its
// engine may have lost. A task queued twice is harmless: the second
// publish is a duplicate within the stream's window, and beyond it the
// worker finds the result stored and does not call again.
func (e *Engine) requeueInFlight(ctx context.Context, names []string) error {
	var last uint64
	if err := jsetup.RetryStartup(ctx, e.log, "the event stream's last sequence", func(sctx context.Context) error {
		info, err := e.store.Stream().Info(sctx)
		if err != nil {
			return err
		}
		last = info.State.LastSeq
		return nil
	}); err != nil {
		return nil // stopping
	}
	if !e.proj.WaitFolded(ctx, last) {
		return nil
	}
	tasks, err := e.cfg.JS.Stream(ctx, e.cfg.Names.TasksStream())
	if err != nil {
		if ctx.Err() != nil {
			return nil // stopping
		}
		return fmt.Errorf("engine: opening %s: %w", e.cfg.Names.TasksStream(), err)
	}
	seen := map[string]bool{}
	requeued := 0
	for _, name := range append(names, e.proj.VMs()...) {
		if seen[name] {
			continue
		}
		seen[name] = true
		rec, err := e.proj.Get(ctx, name)
		if err != nil {
			if ctx.Err() != nil {
				return nil // stopping
			}
			return err
		}
		if rec == nil {
			continue
		}
		for _, f := range rec.InFlight {
			if f.Seq > last {
				continue // decided since start-up: its delivery queues it
			}
			n, err := e.requeue(ctx, tasks, rec, f)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				e.log.Warn("re-queueing a task in flight at start-up failed", "vm", name, "command_id", f.CommandID, "err", err)
				continue
			}
			requeued += n
		}
	}
	e.log.Info("checked the commands in flight at start-up", "vms", len(seen), "up_to_seq", last, "tasks_requeued", requeued)
	return nil
}

// requeue queues the task of in-flight command f of rec unless the tasks
// stream holds it; it returns 1 if it queued it.
func (e *Engine) requeue(ctx context.Context, tasks jetstream.Stream, rec *api.VmRecord, f api.InFlight) (int, error) {
	ev, err := e.storedDecision(ctx, rec.Name, f.CommandID, f.Seq)
	if err != nil {
		return 0, err
	}
	if ev.Type != api.TypeAccepted {
		return 0, fmt.Errorf("in flight at seq %d, which holds a %s", f.Seq, ev.Type)
	}
	queued := 0
	qs := events.TasksOf(ev, f.Seq)
	for _, q := range qs {
		subj := e.cfg.Names.Task(q.Task.Host, ev.VM)
		for seq := uint64(1); ; {
			m, err := tasks.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subj))
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				break
			}
			if err != nil {
				return 0, err
			}
			var t events.Task
			if json.Unmarshal(m.Data, &t) == nil && t.CommandID == f.CommandID {
				queued++ // queued, or being run
				break
			}
			seq = m.Sequence + 1
		}
	}
	if queued == len(qs) {
		return 0, nil
	}
	e.log.Warn("a command in flight had no task queued; queueing it again", "vm", ev.VM, "command_id", ev.CommandID, "action", ev.Action, "host", ev.Host, "accepted_seq", f.Seq)
	return 1, e.follow(ctx, ev, f.Seq)
}

package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
)

// follow does what a stored decision (seq) asks for before its command is
// acked; a rejection asks for nothing. An accepted command gets its task,
// built from the event alone and published with a message id derived from
// the command; a forget first gets its results (see forget). This is the
// one path a task takes: the command is acked only after follow returns,
// so an engine that dies (or a server that fails) between storing the
// decision and storing the task leaves the command unacked, and its
// redelivery, which finds the stored decision, calls follow again. A
// repeat inside the tasks stream's duplicate window stores nothing; beyond
// it, the worker finds the result stored and does not call again.
func (e *Engine) follow(ctx context.Context, ev *api.Event, seq uint64) error {
	if ev.Type != api.TypeAccepted {
		return nil
	}
	if ev.Forget {
		// The fencing task first, then the results: once the results
		// are stored the VM is destroyed and may be purged, and a
		// redelivery after a purge finds nothing left to do.
		if err := e.queueTasks(ctx, ev, seq); err != nil {
			return err
		}
		return e.forget(ctx, ev, seq)
	}
	if ev.Cancel {
		return e.cancelled(ctx, ev)
	}
	if ev.Action == api.ActPurge {
		return e.purged(ctx, ev, seq)
	}
	return e.queueTasks(ctx, ev, seq)
}

// queueTasks publishes the tasks of the decision ev stored at seq, each
// with its message id (a repeat inside the window stores nothing).
func (e *Engine) queueTasks(ctx context.Context, ev *api.Event, seq uint64) error {
	for _, q := range events.TasksOf(ev, seq) {
		body, err := json.Marshal(q.Task)
		if err != nil {
			return err
		}
		if _, err := e.cfg.JS.Publish(ctx, e.cfg.Names.Task(q.Task.Host, ev.VM), body, jetstream.WithMsgID(q.MsgID)); err != nil {
			return fmt.Errorf("queueing the task of %s for vm %s on host %s: %w", ev.Action, ev.VM, q.Task.Host, err)
		}
	}
	return nil
}

// cancelled carries out an accepted cancel of a migration: the migrate
// it abandons gets its failed result here, with the
// message id its source's worker would have used (the cancel is the
// rival of the switch: stored first, it made the source's append of the
// switch fail). Both workers see the result and undo their part.
func (e *Engine) cancelled(ctx context.Context, ev *api.Event) error {
	for _, a := range ev.Abandoned {
		res := api.Event{
			Type: api.TypeFailed, VM: ev.VM, CommandID: a.CommandID, Action: a.Action, Time: time.Now().UTC(),
			Host: ev.Host, State: ev.State, AcceptedSeq: a.Seq, Migration: ev.Migration.Clone(),
			Error: fmt.Sprintf("migrate vm %s from host %s: cancelled by command %s; the vm stays on host %s", ev.VM, ev.Host, ev.CommandID, ev.Host),
		}
		if res.Migration != nil {
			res.Migration.CancelledBy = ev.CommandID
		}
		if _, _, err := e.store.Append(ctx, &res, events.NoExpect, api.ResultMsgID(ev.VM, a.CommandID)); err != nil {
			return fmt.Errorf("cancel: storing the failure of migrate %s: %w", a.CommandID, err)
		}
	}
	return nil
}

// purged carries out an accepted purge stored at seq: it removes the
// VM's events stored before it from the event stream (a filtered purge
// of vm.evt.<vm>.> up to seq). The decision itself stays, as the VM's
// only event: the per-VM concurrency check goes on from it (a later
// decision expects it as the VM's last event, as every engine's record
// says once it is folded), and its fold is what every projector and a
// rebuild make of the name: absent, with no record in VM_RECORDS. The
// purge is idempotent: a repeat (the command redelivered after a crash,
// or another engine's) removes nothing more.
func (e *Engine) purged(ctx context.Context, ev *api.Event, seq uint64) error {
	if err := e.store.Stream().Purge(ctx, jetstream.WithPurgeSubject(e.cfg.Names.VMEvents(ev.VM)), jetstream.WithPurgeSequence(seq)); err != nil {
		return fmt.Errorf("purge: removing the events of vm %s before seq %d: %w", ev.VM, seq, err)
	}
	e.log.Info("purged vm", "vm", ev.VM, "command_id", ev.CommandID, "issuer", ev.Issuer, "seq", seq)
	return nil
}

// forget carries out an accepted destroy with forget (the VM's host is
// lost for good), stored at seq: in place of the host's worker, it stores
// a failed result for each command that was in flight there and the
// destroyed result of the forget. Each write has the message id the
// worker would have used, so a repeat stores nothing twice. Its task (a
// fencing task) waits in the host's queue: if the host ever comes back,
// its worker removes the VM.
func (e *Engine) forget(ctx context.Context, ev *api.Event, seq uint64) error {
	now := time.Now().UTC()
	for _, a := range ev.Abandoned {
		res := api.Event{
			Type: api.TypeFailed, VM: ev.VM, CommandID: a.CommandID, Action: a.Action, Time: now,
			Host: ev.Host, State: api.StateFailed, AcceptedSeq: a.Seq,
			Error: fmt.Sprintf("%s vm %s on host %s: abandoned: the host is lost and the vm was forgotten (command %s)", a.Action, ev.VM, ev.Host, ev.CommandID),
		}
		if _, _, err := e.store.Append(ctx, &res, events.NoExpect, api.ResultMsgID(ev.VM, a.CommandID)); err != nil {
			return fmt.Errorf("forget: storing the failure of abandoned command %s: %w", a.CommandID, err)
		}
	}
	res := api.Event{
		Type: api.TypeDestroyed, VM: ev.VM, CommandID: ev.CommandID, Action: ev.Action, Time: now,
		Host: ev.Host, State: api.StateDestroyed, AcceptedSeq: seq,
		Reason: fmt.Sprintf("forgotten: host %s is lost; if it comes back, its worker removes the vm (fencing)", ev.Host),
	}
	if _, _, err := e.store.Append(ctx, &res, events.NoExpect, api.ResultMsgID(ev.VM, ev.CommandID)); err != nil {
		return fmt.Errorf("forget: storing the destroyed result: %w", err)
	}
	return nil
}

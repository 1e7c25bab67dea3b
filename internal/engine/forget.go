package engine

import (
	"context"
	"fmt"
	"time"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/vm"
)

// finishForget carries out an accepted destroy with forget (the VM's host
// is lost for good), stored at seq; for any other decision it does
// nothing. In place of the host's worker, it stores a failed result for
// each command that was in flight there and the destroyed result of the
// forget. The fencing reaches the host like any task: the accepted
// decision is queued for the host, whose worker removes the VM if it ever
// comes back. The command is acked only after this returns, so a crash
// before the results are stored redelivers it, and the redelivery (which
// finds the decision) finishes it; each write has the message id the
// worker would have used, so a repeat stores nothing twice.
func (e *Engine) finishForget(ctx context.Context, ev *events.Event, seq uint64) error {
	if ev.Type != events.TypeAccepted || !ev.Forget {
		return nil
	}
	now := time.Now().UTC()
	for _, a := range ev.Abandoned {
		res := events.Event{
			Type: events.TypeFailed, VM: ev.VM, CommandID: a.CommandID, Action: a.Action, Time: now,
			Host: ev.Host, State: vm.StateFailed, AcceptedSeq: a.Seq,
			Error: fmt.Sprintf("%s vm %s on host %s: abandoned: the host is lost and the vm was forgotten (command %s)", a.Action, ev.VM, ev.Host, ev.CommandID),
		}
		if _, _, err := e.store.Append(ctx, &res, events.NoExpect, events.ResultMsgID(ev.VM, a.CommandID)); err != nil {
			return fmt.Errorf("forget: storing the failure of abandoned command %s: %w", a.CommandID, err)
		}
	}
	res := events.Event{
		Type: events.TypeDestroyed, VM: ev.VM, CommandID: ev.CommandID, Action: ev.Action, Time: now,
		Host: ev.Host, State: vm.StateDestroyed, AcceptedSeq: seq,
		Reason: fmt.Sprintf("forgotten: host %s is lost; if it comes back, its worker removes the vm (fencing)", ev.Host),
	}
	if _, _, err := e.store.Append(ctx, &res, events.NoExpect, events.ResultMsgID(ev.VM, ev.CommandID)); err != nil {
		return fmt.Errorf("forget: storing the destroyed result: %w", err)
	}
	return nil
}

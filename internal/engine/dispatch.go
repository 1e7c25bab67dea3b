package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/vm"
)

// runDispatcher derives every task from its stored accepted event: the one
// path a task takes. The engines share one durable consumer of accepted
// events; each delivery publishes the task to its host's subject, with a
// message id derived from the command so that a repeat (after a crash
// between publishing and acking) stores it once, and acks the accepted
// event only once the task is stored. An engine that dies after appending
// an accepted event therefore loses nothing: the event is redelivered to a
// dispatcher until its task is stored.
//
// Publishes are pipelined (asynchronous, acked as their acks come), so the
// dispatcher does not wait a round trip, or an fsync, per task.
func (e *Engine) runDispatcher(ctx context.Context) error {
	cons, err := events.CreateConsumer(ctx, e.cfg.JS, e.log, e.cfg.Names.EventsStream(), jetstream.ConsumerConfig{
		Durable:       e.cfg.Names.DispatchConsumer(),
		Description:   "vmherd engines: a task for every accepted command",
		FilterSubject: e.cfg.Names.Event("*", events.TypeAccepted, events.EngineWriter),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       30 * time.Second,
		MaxAckPending: 10000,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	})
	if err != nil {
		return fmt.Errorf("engine: creating dispatch consumer: %w", err)
	}
	var inflight sync.WaitGroup
	cc, err := cons.Consume(func(msg jetstream.Msg) { e.dispatch(msg, &inflight) }, events.PullOpts(1000)...)
	if err != nil {
		return fmt.Errorf("engine: consuming accepted events: %w", err)
	}
	<-ctx.Done()
	cc.Drain()
	<-cc.Closed()
	inflight.Wait()
	return nil
}

// taskAckWait bounds the wait for a task publish's ack; without one the
// accepted event is handed back for another try.
const taskAckWait = 10 * time.Second

// dispatch publishes the task of the accepted event in msg and acks the
// event once the task is stored.
func (e *Engine) dispatch(msg jetstream.Msg, inflight *sync.WaitGroup) {
	ev, err := events.Decode(msg.Data())
	if err != nil {
		e.log.Error("dispatch: an accepted event that does not decode; dropping it", "subject", msg.Subject(), "err", err)
		_ = msg.Term()
		return
	}
	md, err := msg.Metadata()
	if err != nil {
		_ = msg.Nak()
		return
	}
	e.cfg.Metrics.Redelivered("dispatch", md.NumDelivered)
	if ev.Forget {
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			if err := e.forget(ev, md.Sequence.Stream); err != nil {
				e.log.Warn("dispatch: forgetting vm failed; will retry", "vm", ev.VM, "host", ev.Host, "err", err)
				_ = msg.NakWithDelay(time.Second)
				return
			}
			_ = msg.Ack()
		}()
		return
	}
	body, err := json.Marshal(events.TaskFromAccepted(ev, md.Sequence.Stream))
	if err != nil {
		_ = msg.Term()
		return
	}
	m := nats.NewMsg(e.cfg.Names.Task(ev.Host, ev.VM))
	m.Data = body
	f, err := e.cfg.JS.PublishMsgAsync(m, jetstream.WithMsgID(events.TaskMsgID(ev.VM, ev.CommandID)))
	if err != nil {
		e.log.Warn("dispatch: publishing task failed; will retry", "vm", ev.VM, "host", ev.Host, "err", err)
		_ = msg.NakWithDelay(time.Second)
		return
	}
	inflight.Add(1)
	go func() {
		defer inflight.Done()
		t := time.NewTimer(taskAckWait)
		defer t.Stop()
		select {
		case <-f.Ok():
			_ = msg.Ack()
		case err := <-f.Err():
			e.log.Warn("dispatch: storing task failed; will retry", "vm", ev.VM, "host", ev.Host, "err", err)
			_ = msg.NakWithDelay(time.Second)
		case <-t.C:
			e.log.Warn("dispatch: no ack for a task publish; will retry", "vm", ev.VM, "host", ev.Host)
			_ = msg.NakWithDelay(time.Second)
		}
	}()
}

// forget carries out an accepted destroy with forget (the VM's host is
// lost for good): it queues a fencing task for the host, in case it comes
// back, and stores, in place of the host's worker, a failed result for each
// command that was in flight there and the destroyed result of the forget.
// Each write has the message id the worker would have used, so a repeat
// (after a crash before the ack) stores nothing twice.
func (e *Engine) forget(ev *events.Event, seq uint64) error {
	ctx, cancel := context.WithTimeout(context.Background(), taskAckWait)
	defer cancel()
	body, err := json.Marshal(events.TaskFromAccepted(ev, seq))
	if err != nil {
		return err
	}
	if _, err := e.cfg.JS.Publish(ctx, e.cfg.Names.Task(ev.Host, ev.VM), body,
		jetstream.WithMsgID(events.TaskMsgID(ev.VM, ev.CommandID))); err != nil {
		return fmt.Errorf("queueing the fencing task: %w", err)
	}
	now := time.Now().UTC()
	for _, a := range ev.Abandoned {
		res := events.Event{
			Type: events.TypeFailed, VM: ev.VM, CommandID: a.CommandID, Action: a.Action, Time: now,
			Host: ev.Host, State: vm.StateFailed, AcceptedSeq: a.Seq,
			Error: fmt.Sprintf("%s vm %s on host %s: abandoned: the host is lost and the vm was forgotten (command %s)", a.Action, ev.VM, ev.Host, ev.CommandID),
		}
		if _, _, err := e.store.Append(ctx, &res, events.NoExpect, events.ResultMsgID(ev.VM, a.CommandID)); err != nil {
			return fmt.Errorf("storing the failure of abandoned command %s: %w", a.CommandID, err)
		}
	}
	res := events.Event{
		Type: events.TypeDestroyed, VM: ev.VM, CommandID: ev.CommandID, Action: ev.Action, Time: now,
		Host: ev.Host, State: vm.StateDestroyed, AcceptedSeq: seq,
		Reason: fmt.Sprintf("forgotten: host %s is lost; if it comes back, its worker removes the vm (fencing)", ev.Host),
	}
	if _, _, err := e.store.Append(ctx, &res, events.NoExpect, events.ResultMsgID(ev.VM, ev.CommandID)); err != nil {
		return fmt.Errorf("storing the destroyed result: %w", err)
	}
	return nil
}

package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
)

// publishTask sends an accepted command to its host's worker. The message id
// is derived from the command, so publishing again (after a crash, or from
// the dispatcher) stores it once.
func (e *Engine) publishTask(ctx context.Context, ev *events.Event, seq uint64) error {
	task := events.TaskFromAccepted(ev, seq)
	body, err := json.Marshal(task)
	if err != nil {
		return err
	}
	if _, err := e.cfg.JS.Publish(ctx, e.cfg.Names.Task(ev.Host, ev.VM), body,
		jetstream.WithMsgID(events.TaskMsgID(ev.VM, ev.CommandID))); err != nil {
		return fmt.Errorf("publishing task for vm %s to host %s: %w", ev.VM, ev.Host, err)
	}
	e.setDispatch(dispatchKey(ev.VM, ev.CommandID), dispatchDone)
	return nil
}

// Dispatch states of accepted events this engine decided.
const (
	dispatchPending = 1 // accepted event being appended, task not yet published
	dispatchDone    = 2 // task published
)

func (e *Engine) setDispatch(key string, st int) {
	e.mu.Lock()
	if st == 0 {
		delete(e.dispatched, key)
	} else {
		e.dispatched[key] = st
	}
	e.mu.Unlock()
}

func dispatchKey(vmName, cmdID string) string { return vmName + "/" + cmdID }

// runDispatcher derives tasks from accepted events: the recovery path for
// an engine that died between appending an accepted event and publishing
// its task. It acks an accepted event only once its task is stored.
func (e *Engine) runDispatcher(ctx context.Context) error {
	cons, err := e.cfg.JS.CreateOrUpdateConsumer(ctx, e.cfg.Names.EventsStream(), jetstream.ConsumerConfig{
		Durable:       "dispatch",
		Description:   "vmherd engines: a task for every accepted command",
		FilterSubject: e.cfg.Names.EventsOfType(events.TypeAccepted),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       30 * time.Second,
		MaxAckPending: 10000,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	})
	if err != nil {
		return fmt.Errorf("engine: creating dispatch consumer: %w", err)
	}
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		ev, err := events.Decode(msg.Data())
		if err != nil {
			_ = msg.Term()
			return
		}
		key := dispatchKey(ev.VM, ev.CommandID)
		e.mu.Lock()
		st := e.dispatched[key]
		if st == dispatchDone {
			delete(e.dispatched, key)
		}
		e.mu.Unlock()
		switch st {
		case dispatchDone:
			_ = msg.Ack()
			return
		case dispatchPending:
			// This engine is publishing it right now; look again shortly.
			_ = msg.NakWithDelay(200 * time.Millisecond)
			return
		}
		// Decided by another engine, or by one that died: publish it
		// (idempotently, by message id).
		md, err := msg.Metadata()
		if err != nil {
			_ = msg.Nak()
			return
		}
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := e.publishTask(pctx, ev, md.Sequence.Stream); err != nil {
			e.log.Warn("dispatch failed; will retry", "vm", ev.VM, "err", err)
			_ = msg.NakWithDelay(time.Second)
			return
		}
		e.setDispatch(key, 0)
		_ = msg.Ack()
	}, jetstream.PullMaxMessages(1000))
	if err != nil {
		return fmt.Errorf("engine: consuming accepted events: %w", err)
	}
	<-ctx.Done()
	cc.Drain()
	<-cc.Closed()
	return nil
}

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
	return nil
}

// dispatchState is what this engine knows of the task of an accepted
// event it decided.
type dispatchState struct {
	// published: the task is stored; the dispatcher only has to ack.
	published bool
	// held is the dispatcher's delivery of the accepted event, kept while
	// this engine is still publishing the task; the publish acks it (or,
	// if it fails, hands it back to the dispatcher).
	held jetstream.Msg
	// since is when the engine began deciding it.
	since time.Time
}

// dispatchForget is how long a published task's note waits for this
// engine's dispatcher. Another engine's dispatcher may take the accepted
// event instead (they share the consumer), and then the note would stay
// forever; forgetting it costs at most an idempotent republish.
const dispatchForget = 10 * time.Minute

// sweepDispatched drops notes of published tasks older than dispatchForget.
func (e *Engine) sweepDispatched(now time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for k, st := range e.dispatched {
		if st.published && now.Sub(st.since) > dispatchForget {
			delete(e.dispatched, k)
		}
	}
}

func dispatchKey(vmName, cmdID string) string { return vmName + "/" + cmdID }

// dispatchBegin notes that this engine is about to append an accepted
// event and publish its task.
func (e *Engine) dispatchBegin(key string) {
	e.mu.Lock()
	if e.dispatched[key] == nil {
		e.dispatched[key] = &dispatchState{since: time.Now()}
	}
	e.mu.Unlock()
}

// dispatchEnd notes that this engine published the task of key, or that it
// will not (the append failed, or publishing did): then the dispatcher
// publishes it from the accepted event, if there is one.
func (e *Engine) dispatchEnd(key string, published bool) {
	e.mu.Lock()
	st := e.dispatched[key]
	if st == nil {
		e.mu.Unlock()
		return
	}
	held := st.held
	if held != nil || !published {
		delete(e.dispatched, key)
	} else {
		st.published = true
	}
	e.mu.Unlock()
	switch {
	case held == nil:
	case published:
		_ = held.Ack()
	default:
		go e.dispatch(held)
	}
}

// runDispatcher derives tasks from accepted events: the recovery path for
// an engine that died between appending an accepted event and publishing
// its task. It acks an accepted event only once its task is stored.
func (e *Engine) runDispatcher(ctx context.Context) error {
	cons, err := events.CreateConsumer(ctx, e.cfg.JS, e.log, e.cfg.Names.EventsStream(), jetstream.ConsumerConfig{
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
	e.mu.Lock()
	e.runCtx = ctx
	e.mu.Unlock()
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		// Most accepted events are this engine's, their tasks published:
		// peek at what names the command instead of decoding it all.
		var id struct {
			VM        string `json:"vm"`
			CommandID string `json:"command_id"`
		}
		if json.Unmarshal(msg.Data(), &id) != nil || id.VM == "" {
			_ = msg.Term()
			return
		}
		key := dispatchKey(id.VM, id.CommandID)
		e.mu.Lock()
		st := e.dispatched[key]
		switch {
		case st == nil:
		case st.published:
			delete(e.dispatched, key)
		default:
			// This engine is publishing it right now; its publish acks it.
			st.held = msg
		}
		e.mu.Unlock()
		switch {
		case st == nil:
			// Decided by another engine, or by one that died: publish it
			// (idempotently, by message id).
			e.dispatch(msg)
		case st.published:
			_ = msg.Ack()
		}
	}, jetstream.PullMaxMessages(1000))
	if err != nil {
		return fmt.Errorf("engine: consuming accepted events: %w", err)
	}
	sweep := time.NewTicker(time.Minute)
	defer sweep.Stop()
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case now := <-sweep.C:
			e.sweepDispatched(now)
		}
	}
	cc.Drain()
	<-cc.Closed()
	return nil
}

// dispatch publishes the task of the accepted event in msg and acks it.
func (e *Engine) dispatch(msg jetstream.Msg) {
	e.mu.Lock()
	ctx := e.runCtx
	e.mu.Unlock()
	ev, err := events.Decode(msg.Data())
	if err != nil {
		_ = msg.Term()
		return
	}
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
	_ = msg.Ack()
}

package bench

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The bare pipeline is the message pattern any event-sourced design with
// vmherd's guarantees needs, with no vmherd code: a command stored (and
// acked to its publisher), delivered to a decider that stores a decision
// before acking the command, the decision delivered to an executor that
// stores a result before acking the decision, and the result delivered to
// the waiting client. Three stored writes per transition; no task stream,
// no projection, no record, no look for an earlier result, no validation,
// no state machine. Its rate, against the async publish baseline of the
// same run, is a ceiling for vmherd on this machine: what JetStream and
// nats.go cost for the fewest messages that keep a command, its one
// decision and its one result durable.
const (
	bareCmdStream = "BENCH_BARE_CMD"
	bareEvtStream = "BENCH_BARE_EVT"
)

// barePipeline runs n clients in figure 1's closed loop (closedLoop) through
// the bare pipeline for warm+measure. The decider and executor run as
// many calls at once as vmherd's engine (256) and worker (64) by default,
// each on its own connection.
func barePipeline(ctx context.Context, srv *server, size, n int, warm, measure time.Duration) (Throughput, error) {
	var conns []*nats.Conn
	defer func() {
		for _, nc := range conns {
			nc.Close()
		}
	}()
	open := func(name string) (jetstream.JetStream, error) {
		nc, js, err := connect(srv.url, name)
		if err == nil {
			conns = append(conns, nc)
		}
		return js, err
	}
	admin, err := open("bench-bare-admin")
	if err != nil {
		return Throughput{}, err
	}
	for _, sc := range []jetstream.StreamConfig{
		{Name: bareCmdStream, Subjects: []string{"bare.cmd.>"}},
		{Name: bareEvtStream, Subjects: []string{"bare.evt.>"}},
	} {
		sc.Storage, sc.Retention, sc.Replicas = jetstream.FileStorage, jetstream.LimitsPolicy, 1
		_ = admin.DeleteStream(ctx, sc.Name)
		if _, err := admin.CreateStream(ctx, sc); err != nil {
			return Throughput{}, fmt.Errorf("bare pipeline: creating %s: %w", sc.Name, err)
		}
		defer func() { _ = admin.DeleteStream(context.WithoutCancel(ctx), sc.Name) }()
	}
	payload := letters(size)

	// A stage stores what follows from each message it is delivered, then
	// acks it.
	stage := func(name, stream, filter string, limit int, next func(subj string) string) (func(), error) {
		js, err := open("bench-bare-" + name)
		if err != nil {
			return nil, err
		}
		cons, err := js.CreateOrUpdateConsumer(ctx, stream, jetstream.ConsumerConfig{
			Durable: name, FilterSubject: filter, AckPolicy: jetstream.AckExplicitPolicy,
			MaxAckPending: 4 * limit, DeliverPolicy: jetstream.DeliverAllPolicy,
		})
		if err != nil {
			return nil, err
		}
		sem := make(chan struct{}, limit)
		var wg sync.WaitGroup
		cc, err := cons.Consume(func(m jetstream.Msg) {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				if _, err := js.Publish(ctx, next(m.Subject()), payload); err != nil {
					_ = m.Nak()
					return
				}
				_ = m.Ack()
			})
		}, jetstream.PullMaxMessages(2*limit))
		if err != nil {
			return nil, err
		}
		return func() { cc.Stop(); wg.Wait() }, nil
	}
	vmOf := func(subj string) string { return strings.Split(subj, ".")[2] }
	stopDecider, err := stage("decider", bareCmdStream, "bare.cmd.>", 256, func(s string) string { return "bare.evt." + vmOf(s) + ".accepted" })
	if err != nil {
		return Throughput{}, err
	}
	defer stopDecider()
	stopExecutor, err := stage("executor", bareEvtStream, "bare.evt.*.accepted", 64, func(s string) string { return "bare.evt." + vmOf(s) + ".done" })
	if err != nil {
		return Throughput{}, err
	}
	defer stopExecutor()

	// The client: one ordered consumer over the results, as figure 1's.
	cjs, err := open("bench-bare-client")
	if err != nil {
		return Throughput{}, err
	}
	var mu sync.Mutex
	waits := map[string]chan time.Time{}
	cons, err := cjs.OrderedConsumer(ctx, bareEvtStream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{"bare.evt.*.done"}, DeliverPolicy: jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return Throughput{}, err
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(2000))
	if err != nil {
		return Throughput{}, err
	}
	defer it.Stop()
	go func() {
		for {
			m, err := it.Next()
			if err != nil {
				return
			}
			at := time.Now()
			name := vmOf(m.Subject())
			mu.Lock()
			ch := waits[name]
			delete(waits, name)
			mu.Unlock()
			if ch != nil {
				ch <- at
			}
		}
	}()

	b, err := closedLoop(ctx, srv, n, warm, measure, func(i int) sendFunc {
		name := fmt.Sprintf("b%04d", i)
		return func(ctx context.Context) (time.Time, time.Time, bool, error) {
			ch := make(chan time.Time, 1)
			mu.Lock()
			waits[name] = ch
			mu.Unlock()
			sent := time.Now()
			if _, err := cjs.Publish(ctx, "bare.cmd."+name+".start", payload); err != nil {
				return sent, time.Time{}, false, err
			}
			select {
			case at := <-ch:
				return sent, at, true, nil
			case <-ctx.Done():
				return sent, time.Time{}, false, ctx.Err()
			}
		}
	})
	if err != nil {
		return Throughput{}, fmt.Errorf("bare pipeline: %w", err)
	}
	return b, nil
}

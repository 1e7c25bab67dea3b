package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
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

// Bare is the bare pipeline's figure for one VM count.
type Bare struct {
	VMs        int     `json:"vms"`
	PerS       float64 `json:"transitions_per_s"`
	Ratio      float64 `json:"ratio_to_async_pub"`
	Latency    Dist    `json:"latency"`
	MsgsInPer  float64 `json:"server_msgs_in_per_transition"`
	MsgsOutPer float64 `json:"server_msgs_out_per_transition"`
}

// barePipeline runs n clients in a closed loop (as figure 1 does) through
// the bare pipeline for warm+measure. The decider and executor run as
// many calls at once as vmherd's engine (256) and worker (64) by default,
// each on its own connection.
func barePipeline(ctx context.Context, srv *server, size, n int, warm, measure time.Duration) (Bare, error) {
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
		return Bare{}, err
	}
	for _, sc := range []jetstream.StreamConfig{
		{Name: bareCmdStream, Subjects: []string{"bare.cmd.>"}},
		{Name: bareEvtStream, Subjects: []string{"bare.evt.>"}},
	} {
		sc.Storage, sc.Retention, sc.Replicas = jetstream.FileStorage, jetstream.LimitsPolicy, 1
		_ = admin.DeleteStream(ctx, sc.Name)
		if _, err := admin.CreateStream(ctx, sc); err != nil {
			return Bare{}, fmt.Errorf("bare pipeline: creating %s: %w", sc.Name, err)
		}
		defer func() { _ = admin.DeleteStream(context.WithoutCancel(ctx), sc.Name) }()
	}
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = 'a' + byte(i%26)
	}

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
		return Bare{}, err
	}
	defer stopDecider()
	stopExecutor, err := stage("executor", bareEvtStream, "bare.evt.*.accepted", 64, func(s string) string { return "bare.evt." + vmOf(s) + ".done" })
	if err != nil {
		return Bare{}, err
	}
	defer stopExecutor()

	// The client: one ordered consumer over the results, as figure 1's.
	cjs, err := open("bench-bare-client")
	if err != nil {
		return Bare{}, err
	}
	var mu sync.Mutex
	waits := map[string]chan time.Time{}
	cons, err := cjs.OrderedConsumer(ctx, bareEvtStream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{"bare.evt.*.done"}, DeliverPolicy: jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return Bare{}, err
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(2000))
	if err != nil {
		return Bare{}, err
	}
	defer it.Stop()
	go func() {
		for {
			m, err := it.Next()
			if err != nil {
				return
			}
			at := time.Now()
			mu.Lock()
			ch := waits[vmOf(m.Subject())]
			delete(waits, vmOf(m.Subject()))
			mu.Unlock()
			if ch != nil {
				ch <- at
			}
		}
	}()

	in0, out0 := srv.msgs()
	start := time.Now()
	from, end := start.Add(warm), start.Add(warm+measure)
	cctx, cancel := context.WithDeadline(ctx, end.Add(60*time.Second))
	defer cancel()
	var all, count atomic.Int64
	var lats []time.Duration
	var firstErr error
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			name := fmt.Sprintf("b%04d", i)
			var mine []time.Duration
			for time.Now().Before(end) {
				ch := make(chan time.Time, 1)
				mu.Lock()
				waits[name] = ch
				mu.Unlock()
				sent := time.Now()
				_, err := cjs.Publish(cctx, "bare.cmd."+name+".start", payload)
				if err == nil {
					select {
					case at := <-ch:
						all.Add(1)
						if at.After(from) && !at.After(end) {
							count.Add(1)
							mine = append(mine, at.Sub(sent))
						}
						continue
					case <-cctx.Done():
						err = cctx.Err()
					}
				}
				mu.Lock()
				firstErr = errors.Join(firstErr, err)
				mu.Unlock()
				return
			}
			mu.Lock()
			lats = append(lats, mine...)
			mu.Unlock()
		})
	}
	wg.Wait()
	if firstErr != nil {
		return Bare{}, fmt.Errorf("bare pipeline: %w", firstErr)
	}
	in1, out1 := srv.msgs()
	return Bare{
		VMs: n, PerS: float64(count.Load()) / measure.Seconds(), Latency: dist(lats),
		MsgsInPer: ratio(float64(in1-in0), float64(all.Load())), MsgsOutPer: ratio(float64(out1-out0), float64(all.Load())),
	}, nil
}

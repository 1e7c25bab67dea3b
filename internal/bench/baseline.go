package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"
)

// The baselines publish to their own stream on the same server, with the
// settings of VM_EVENTS (file storage, limits retention, one replica), so
// the only difference from the pipeline is vmherd itself.
const (
	baseStream  = "BENCH_BASELINE"
	baseSubject = "bench.baseline"
)

func baselineStream(ctx context.Context, js jetstream.JetStream) (func(), error) {
	_ = js.DeleteStream(ctx, baseStream)
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: baseStream, Subjects: []string{baseSubject}, Storage: jetstream.FileStorage,
		Retention: jetstream.LimitsPolicy, Replicas: 1,
	})
	if err != nil {
		return nil, fmt.Errorf("creating the baseline stream: %w", err)
	}
	return func() { _ = js.DeleteStream(context.WithoutCancel(ctx), baseStream) }, nil
}

// eventSize is the size of a typical vmherd event body (a result carrying
// the VM's handle), the message size class of the baselines.
func eventSize() int {
	spec := api.VmSpec{Name: "tp1000-0001", Backend: api.BackendNoop, Vcpus: 1, MemoryMB: 128}.WithDefaults()
	h := api.VmHandle{ID: "0123456789abcdef", Name: spec.Name, Backend: api.BackendNoop, Host: benchHost, PID: 1234,
		StartedAt: time.Now().UTC(), Spec: &spec}
	ev := api.Event{Type: api.TypeStarted, VM: spec.Name, CommandID: "tp1000-0001-12", Action: "start",
		Time: time.Now().UTC(), Host: benchHost, State: api.StateRunning, Handle: &h, AcceptedSeq: 123456}
	return len(ev.Encode())
}

// letters is a payload of size bytes, a to z over and over.
func letters(size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = 'a' + byte(i%26)
	}
	return b
}

// AsyncPub is the JetStream async publish baseline.
type AsyncPub struct {
	Msgs     int     `json:"msgs"`
	Size     int     `json:"size_bytes"`
	Seconds  float64 `json:"seconds"`
	MsgsPerS float64 `json:"msgs_per_s"`
	// Server messages per published message (the publish and its ack).
	MsgsInPer  float64 `json:"server_msgs_in_per_msg"`
	MsgsOutPer float64 `json:"server_msgs_out_per_msg"`
}

// asyncPubRate is `nats bench js pub async` written with nats.go: one
// publisher sends batches of 100 messages with PublishAsync and waits for
// every ack of a batch before the next, for d.
func asyncPubRate(ctx context.Context, js jetstream.JetStream, srv *server, size int, d time.Duration) (AsyncPub, error) {
	done, err := baselineStream(ctx, js)
	if err != nil {
		return AsyncPub{}, err
	}
	defer done()
	in0, out0 := srv.msgs()
	payload := letters(size)
	const batch = 100
	n := 0
	start := time.Now()
	end := start.Add(d)
	for time.Now().Before(end) {
		futs := make([]jetstream.PubAckFuture, 0, batch)
		for range batch {
			f, err := js.PublishAsync(baseSubject, payload)
			if err != nil {
				return AsyncPub{}, fmt.Errorf("async publish: %w", err)
			}
			futs = append(futs, f)
		}
		select {
		case <-js.PublishAsyncComplete():
		case <-ctx.Done():
			return AsyncPub{}, ctx.Err()
		case <-time.After(30 * time.Second):
			return AsyncPub{}, fmt.Errorf("async publish: acks did not arrive within 30s")
		}
		for _, f := range futs {
			select {
			case err := <-f.Err():
				return AsyncPub{}, fmt.Errorf("async publish: %w", err)
			default:
			}
		}
		n += batch
	}
	secs := time.Since(start).Seconds()
	in1, out1 := srv.msgs()
	return AsyncPub{Msgs: n, Size: size, Seconds: secs, MsgsPerS: float64(n) / secs,
		MsgsInPer: ratio(float64(in1-in0), float64(n)), MsgsOutPer: ratio(float64(out1-out0), float64(n))}, nil
}

// syncPubLatency is the JetStream synchronous publish round trip: one
// publish at a time, each waiting for its ack, gap apart.
func syncPubLatency(ctx context.Context, js jetstream.JetStream, size, n int, gap time.Duration) (Dist, error) {
	done, err := baselineStream(ctx, js)
	if err != nil {
		return Dist{}, err
	}
	defer done()
	payload := make([]byte, size)
	var ds []time.Duration
	for i := range n {
		t0 := time.Now()
		if _, err := js.Publish(ctx, baseSubject, payload); err != nil {
			return Dist{}, fmt.Errorf("sync publish: %w", err)
		}
		if i >= 5 { // warm-up
			ds = append(ds, time.Since(t0))
		}
		time.Sleep(gap)
	}
	return dist(ds), nil
}

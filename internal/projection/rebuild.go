package projection

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
)

// Replay folds the whole event stream, as it is when Replay starts, into
// records, with an ordered consumer. It returns the records of VMs that
// exist and the number of events folded.
//
// Decoding the events is most of the work, and it does not depend on
// order: batches of events are decoded on as many goroutines as there are
// CPUs, then folded one by one, in stream order, into records that Replay
// owns (so it folds in place instead of copying each record per event).
func Replay(ctx context.Context, js jetstream.JetStream, n api.Names) (map[string]*api.VmRecord, int, error) {
	recs, _, count, err := replay(ctx, js, n)
	return recs, count, err
}

// replay is Replay that also returns the names whose fold ends absent:
// purged VMs, whose records' keys hold a delete marker.
func replay(ctx context.Context, js jetstream.JetStream, n api.Names) (map[string]*api.VmRecord, []string, int, error) {
	st, err := js.Stream(ctx, n.EventsStream())
	if err != nil {
		return nil, nil, 0, fmt.Errorf("replay: %w", err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return nil, nil, 0, fmt.Errorf("replay: %w", err)
	}
	recs := map[string]*api.VmRecord{}
	last := info.State.LastSeq
	if info.State.Msgs == 0 {
		return recs, nil, 0, nil
	}
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{InactiveThreshold: jsetup.ReaderIdle})
	if err != nil {
		return nil, nil, 0, fmt.Errorf("replay: %w", err)
	}
	defer jsetup.DropConsumer(st, cons)
	it, err := cons.Messages(jetstream.PullMaxMessages(4096))
	if err != nil {
		return nil, nil, 0, fmt.Errorf("replay: %w", err)
	}
	defer it.Stop()
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(rctx, it.Stop)
	defer stop()

	workers := max(1, runtime.GOMAXPROCS(0))
	todo := make(chan *replayBatch, 2*workers)
	done := make(chan *replayBatch, 2*workers)
	var readErr error
	go func() {
		defer close(todo)
		readErr = readBatches(rctx, it, last, todo)
	}()
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for b := range todo {
				b.decode(n)
				select {
				case done <- b:
				case <-rctx.Done():
					return
				}
			}
		})
	}
	go func() { wg.Wait(); close(done) }()

	count, next := 0, 0
	waiting := map[int]*replayBatch{}
	for b := range done {
		waiting[b.index] = b
		for b := waiting[next]; b != nil; b = waiting[next] {
			delete(waiting, next)
			next++
			count += b.fold(recs)
		}
	}
	// done is closed: the reader has returned.
	if readErr != nil {
		if ctx.Err() != nil {
			return nil, nil, count, ctx.Err()
		}
		return nil, nil, count, fmt.Errorf("replay: %w", readErr)
	}
	var absent []string
	for k, r := range recs {
		if !r.Exists() {
			absent = append(absent, k)
			delete(recs, k)
		}
	}
	return recs, absent, count, nil
}

// replayBatch is a run of consecutive events of the stream.
type replayBatch struct {
	index int
	msgs  []replayMsg
}

type replayMsg struct {
	seq  uint64
	subj string
	data []byte
	// Filled by decode: the VM (empty if the subject names none) and the
	// event (nil if it is not one vmherd wrote).
	vm string
	ev *api.Event
}

const replayBatchSize = 512

// readBatches reads the stream up to last into batches.
func readBatches(ctx context.Context, it jetstream.MessagesContext, last uint64, out chan<- *replayBatch) error {
	b := &replayBatch{}
	for {
		msg, err := it.Next()
		if err != nil {
			return err
		}
		md, err := msg.Metadata()
		if err != nil {
			return err
		}
		seq := md.Sequence.Stream
		data := msg.Data()
		if events.StoredByServer(msg.Headers()) {
			data = nil // as the projector: not an event
		}
		b.msgs = append(b.msgs, replayMsg{seq: seq, subj: msg.Subject(), data: data})
		if len(b.msgs) == replayBatchSize || seq >= last {
			select {
			case out <- b:
			case <-ctx.Done():
				return ctx.Err()
			}
			if seq >= last {
				return nil
			}
			b = &replayBatch{index: b.index + 1, msgs: make([]replayMsg, 0, replayBatchSize)}
		}
	}
}

// decode decodes the batch's events (on any goroutine).
func (b *replayBatch) decode(n api.Names) {
	for i := range b.msgs {
		m := &b.msgs[i]
		name, _, _, ok := n.ParseEventSubject(m.subj)
		if !ok {
			continue
		}
		m.vm = name // validated by fold, once per VM
		if ev, err := events.DecodeStored(n, m.subj, m.data); err == nil {
			m.ev = ev
		}
		m.data = nil
	}
}

// fold folds the batch, in order, into recs and returns how many events
// it folded.
func (b *replayBatch) fold(recs map[string]*api.VmRecord) int {
	n := 0
	for _, m := range b.msgs {
		if m.vm == "" {
			continue
		}
		r := recs[m.vm]
		if r == nil && api.ValidateName(m.vm) != nil {
			continue
		}
		n++
		if r == nil {
			if m.ev == nil {
				continue
			}
			r = &api.VmRecord{Name: m.ev.VM, State: fsm.StateAbsent}
			recs[m.vm] = r
		}
		if m.seq > r.LastSeq {
			foldInto(r, m.ev, m.seq, true)
		}
	}
	return n
}

// Load reads every record in the bucket, with direct gets
// (events.KVEntries): workers and vmctl may read the bucket, not watch it.
func Load(ctx context.Context, js events.KVReader, n api.Names) (map[string]*api.VmRecord, error) {
	es, err := events.KVEntries(ctx, js, n.RecordsBucket(), "")
	if err != nil {
		return nil, err
	}
	out := map[string]*api.VmRecord{}
	for _, e := range es {
		r, err := api.UnmarshalRecord(e.Value())
		if err != nil {
			return nil, fmt.Errorf("record %s: %w", e.Key(), err)
		}
		out[e.Key()] = r
	}
	return out, nil
}

// Rebuild drops the records bucket and writes it again from the event
// stream. Running projectors notice the new revisions and carry on.
func Rebuild(ctx context.Context, js jetstream.JetStream, n api.Names, s jsetup.Settings) (int, int, error) {
	recs, absent, count, err := replay(ctx, js, n)
	if err != nil {
		return 0, 0, err
	}
	if err := js.DeleteKeyValue(ctx, n.RecordsBucket()); err != nil && !errors.Is(err, jetstream.ErrBucketNotFound) {
		return 0, 0, fmt.Errorf("rebuild: dropping %s: %w", n.RecordsBucket(), err)
	}
	var cfg jetstream.KeyValueConfig
	for _, c := range jsetup.BucketConfigs(n, s) {
		if c.Bucket == n.RecordsBucket() {
			cfg = c
		}
	}
	if err := jsetup.EnsureBucket(ctx, js, cfg); err != nil {
		return 0, 0, fmt.Errorf("rebuild: %w", err)
	}
	if err := putAll(ctx, js, n.RecordsBucket(), recs); err != nil {
		return 0, 0, err
	}
	// A purged VM's key gets its delete marker back, as the live
	// projection left it: the engines' start-up check of purges and the
	// key sweeper find purged names by it.
	kv, err := js.KeyValue(ctx, n.RecordsBucket())
	if err != nil {
		return 0, 0, fmt.Errorf("rebuild: %w", err)
	}
	st, err := js.Stream(ctx, n.EventsStream())
	if err != nil {
		return 0, 0, fmt.Errorf("rebuild: %w", err)
	}
	for _, name := range absent {
		// Absent also folds from a name with only rejections: no marker.
		if _, purged, err := events.LastPurge(ctx, st, n, name); err != nil {
			return 0, 0, fmt.Errorf("rebuild: %w", err)
		} else if !purged {
			continue
		}
		if err := kv.Delete(ctx, name); err != nil {
			return 0, 0, fmt.Errorf("rebuild: marking %s purged: %w", name, err)
		}
	}
	return len(recs), count, nil
}

// putAll writes every record into the (new, empty) bucket with pipelined
// asynchronous publishes, keeping up to a window of them unacknowledged,
// where kv.Put would wait a round trip for each. Records are encoded on
// other goroutines meanwhile.
func putAll(ctx context.Context, js jetstream.JetStream, bucket string, recs map[string]*api.VmRecord) error {
	type put struct {
		name string
		data []byte
		f    jetstream.PubAckFuture
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	names := make(chan string, 1024)
	encoded := make(chan put, 1024)
	go func() {
		defer close(names)
		for name := range recs {
			select {
			case names <- name:
			case <-pctx.Done():
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for range max(1, runtime.GOMAXPROCS(0)-1) {
		wg.Go(func() {
			for name := range names {
				select {
				case encoded <- put{name: name, data: recs[name].Marshal()}:
				case <-pctx.Done():
					return
				}
			}
		})
	}
	go func() { wg.Wait(); close(encoded) }()

	const window = 2048
	var inflight []put
	wait := func(p put) error {
		select {
		case <-p.f.Ok():
			return nil
		case err := <-p.f.Err():
			return fmt.Errorf("rebuild: writing %s: %w", p.name, err)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	for p := range encoded {
		if len(inflight) == window {
			if err := wait(inflight[0]); err != nil {
				return err
			}
			inflight = inflight[1:]
		}
		f, err := js.PublishAsync(events.KVPutSubject(js, bucket, p.name), p.data)
		if err != nil {
			return fmt.Errorf("rebuild: writing %s: %w", p.name, err)
		}
		p.f, p.data = f, nil
		inflight = append(inflight, p)
	}
	for _, p := range inflight {
		if err := wait(p); err != nil {
			return err
		}
	}
	return ctx.Err()
}

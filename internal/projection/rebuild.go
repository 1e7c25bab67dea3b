package projection

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/vm"
)

// Replay folds the whole event stream, as it is when Replay starts, into
// records, with an ordered consumer. It returns the records of VMs that
// exist and the number of events folded.
func Replay(ctx context.Context, js jetstream.JetStream, n events.Names) (map[string]*VmRecord, int, error) {
	st, err := js.Stream(ctx, n.EventsStream())
	if err != nil {
		return nil, 0, fmt.Errorf("replay: %w", err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return nil, 0, fmt.Errorf("replay: %w", err)
	}
	recs := map[string]*VmRecord{}
	last := info.State.LastSeq
	if info.State.Msgs == 0 {
		return recs, 0, nil
	}
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return nil, 0, fmt.Errorf("replay: %w", err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(4096))
	if err != nil {
		return nil, 0, fmt.Errorf("replay: %w", err)
	}
	defer it.Stop()
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	count := 0
	for {
		msg, err := it.Next()
		if err != nil {
			if ctx.Err() != nil {
				return nil, count, ctx.Err()
			}
			return nil, count, fmt.Errorf("replay: %w", err)
		}
		md, err := msg.Metadata()
		if err != nil {
			return nil, count, fmt.Errorf("replay: %w", err)
		}
		seq := md.Sequence.Stream
		if name, _, ok := n.ParseEventSubject(msg.Subject()); ok && vm.ValidateName(name) == nil {
			ev, derr := events.Decode(msg.Data())
			if derr != nil || ev.VM != name {
				ev = nil
			}
			if r := Fold(recs[name], ev, seq); r != nil {
				recs[name] = r
			}
			count++
		}
		if seq >= last {
			break
		}
	}
	for k, r := range recs {
		if !r.Exists() {
			delete(recs, k)
		}
	}
	return recs, count, nil
}

// Load reads every record in the bucket.
func Load(ctx context.Context, js jetstream.JetStream, n events.Names) (map[string]*VmRecord, error) {
	kv, err := js.KeyValue(ctx, n.RecordsBucket())
	if err != nil {
		return nil, err
	}
	out := map[string]*VmRecord{}
	lister, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, err
	}
	for k := range lister.Keys() {
		e, err := kv.Get(ctx, k)
		if err != nil {
			if errors.Is(err, jetstream.ErrKeyNotFound) {
				continue
			}
			return nil, err
		}
		r, err := Unmarshal(e.Value())
		if err != nil {
			return nil, fmt.Errorf("record %s: %w", k, err)
		}
		out[k] = r
	}
	return out, nil
}

// Rebuild drops the records bucket and writes it again from the event
// stream. Running projectors notice the new revisions and carry on.
func Rebuild(ctx context.Context, js jetstream.JetStream, n events.Names, s events.Settings) (int, int, error) {
	recs, count, err := Replay(ctx, js, n)
	if err != nil {
		return 0, 0, err
	}
	if err := js.DeleteKeyValue(ctx, n.RecordsBucket()); err != nil && !errors.Is(err, jetstream.ErrBucketNotFound) {
		return 0, 0, fmt.Errorf("rebuild: dropping %s: %w", n.RecordsBucket(), err)
	}
	var cfg jetstream.KeyValueConfig
	for _, c := range n.BucketConfigs(s) {
		if c.Bucket == n.RecordsBucket() {
			cfg = c
		}
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, cfg)
	if err != nil {
		return 0, 0, fmt.Errorf("rebuild: creating %s: %w", n.RecordsBucket(), err)
	}
	for name, r := range recs {
		if _, err := kv.Put(ctx, name, r.Marshal()); err != nil {
			return 0, 0, fmt.Errorf("rebuild: writing %s: %w", name, err)
		}
	}
	return len(recs), count, nil
}

package events

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// KVEntries returns the current entries of a bucket whose keys match
// filter (a subject pattern over the keys, "" for every key), read with
// batched direct gets: no consumer is created. Deleted and purged keys are
// left out. vmherd's buckets keep one revision per key, so the entries
// are the bucket's messages in stream order.
//
// It is how clients list a bucket: a KV watch (what jetstream's ListKeys
// and Watch use) is a consumer its client deletes when done, and the
// identities that only read a bucket may not delete consumers
// (docs/trust.md).
func KVEntries(ctx context.Context, js KVReader, bucket, filter string) ([]jetstream.KeyValueEntry, error) {
	all, err := kvLatest(ctx, js, bucket, filter)
	if err != nil {
		return nil, err
	}
	live := all[:0]
	for _, e := range all {
		if e.Operation() == jetstream.KeyValuePut {
			live = append(live, e)
		}
	}
	return live, nil
}

// KVDeleted returns the keys of a bucket matching filter whose latest
// entry is a delete or purge marker, read as KVEntries reads.
func KVDeleted(ctx context.Context, js KVReader, bucket, filter string) ([]string, error) {
	all, err := kvLatest(ctx, js, bucket, filter)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range all {
		if e.Operation() != jetstream.KeyValuePut {
			out = append(out, e.Key())
		}
	}
	return out, nil
}

// kvLatest is each key's latest entry, markers included, in stream order.
func kvLatest(ctx context.Context, js KVReader, bucket, filter string) ([]jetstream.KeyValueEntry, error) {
	if filter == "" {
		filter = ">"
	}
	o := js.Options()
	api := o.APIPrefix
	if api == "" {
		api = jetstream.DefaultAPIPrefix
	}
	if !strings.HasSuffix(api, ".") {
		api += "."
	}
	subj := api + "DIRECT.GET.KV_" + bucket
	prefix := "$KV." + bucket + "."
	nc := js.Conn()
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil, fmt.Errorf("reading bucket %s: %w", bucket, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	var out []jetstream.KeyValueEntry
	latest := map[string]int{}
	const batch = 256
pages:
	for seq := uint64(1); ; {
		req, _ := json.Marshal(map[string]any{"seq": seq, "next_by_subj": prefix + filter, "batch": batch})
		if err := nc.PublishRequest(subj, inbox, req); err != nil {
			return nil, fmt.Errorf("reading bucket %s: %w", bucket, err)
		}
		more := false
		for done := false; !done; {
			m, err := sub.NextMsg(timeLeft(ctx))
			if err != nil {
				if errors.Is(err, nats.ErrTimeout) && ctx.Err() != nil {
					err = ctx.Err()
				}
				return nil, fmt.Errorf("reading bucket %s: %w", bucket, err)
			}
			switch status := m.Header.Get("Status"); status {
			case "":
			case "404": // nothing (more) matches
				break pages
			case "204": // end of this batch
				done = true
				continue
			default:
				return nil, fmt.Errorf("reading bucket %s: status %s %s", bucket, status, m.Header.Get("Description"))
			}
			e, err := entryOf(bucket, prefix, m)
			if err != nil {
				return nil, fmt.Errorf("reading bucket %s: %w", bucket, err)
			}
			seq = e.rev + 1
			more = m.Header.Get("Nats-Num-Pending") != "0"
			if i, ok := latest[e.key]; ok {
				out[i] = e
			} else {
				latest[e.key] = len(out)
				out = append(out, e)
			}
		}
		if !more {
			break
		}
	}
	return out, nil
}

// KVReader is what KVEntries needs of JetStream: the connection and the
// API prefix.
type KVReader interface {
	Options() jetstream.JetStreamOptions
	Conn() *nats.Conn
}

// timeLeft is ctx's time to its deadline (5 s without one).
func timeLeft(ctx context.Context) time.Duration {
	if d, ok := ctx.Deadline(); ok {
		return max(time.Until(d), time.Millisecond)
	}
	return 5 * time.Second
}

// kvEntry is one bucket entry read by a direct get.
type kvEntry struct {
	bucket, key string
	value       []byte
	rev         uint64
	created     time.Time
	op          jetstream.KeyValueOp
}

func entryOf(bucket, prefix string, m *nats.Msg) (kvEntry, error) {
	e := kvEntry{bucket: bucket, value: m.Data, op: jetstream.KeyValuePut}
	subj := m.Header.Get(jetstream.SubjectHeader)
	key, ok := strings.CutPrefix(subj, prefix)
	if !ok {
		return e, fmt.Errorf("message on %q is not in the bucket", subj)
	}
	e.key = key
	rev, err := strconv.ParseUint(m.Header.Get(jetstream.SequenceHeader), 10, 64)
	if err != nil {
		return e, fmt.Errorf("key %s: bad sequence header: %w", key, err)
	}
	e.rev = rev
	if e.created, err = time.Parse(time.RFC3339Nano, m.Header.Get(jetstream.TimeStampHeaer)); err != nil {
		return e, fmt.Errorf("key %s: bad time stamp header: %w", key, err)
	}
	switch m.Header.Get("KV-Operation") {
	case "DEL":
		e.op = jetstream.KeyValueDelete
	case "PURGE":
		e.op = jetstream.KeyValuePurge
	}
	return e, nil
}

func (e kvEntry) Bucket() string                  { return e.bucket }
func (e kvEntry) Key() string                     { return e.key }
func (e kvEntry) Value() []byte                   { return e.value }
func (e kvEntry) Revision() uint64                { return e.rev }
func (e kvEntry) Created() time.Time              { return e.created }
func (e kvEntry) Delta() uint64                   { return 0 }
func (e kvEntry) Operation() jetstream.KeyValueOp { return e.op }

var _ jetstream.KeyValueEntry = kvEntry{}

// KVPoll watches the keys of bucket matching filter by reading them
// (KVEntries) every interval, and delivers the entries that changed since
// the first reading: jetstream's Watch with UpdatesOnly, without a
// consumer. A deleted key is not reported. Stop ends it.
func KVPoll(ctx context.Context, js KVReader, bucket, filter string, every time.Duration) (jetstream.KeyWatcher, error) {
	seen := map[string]uint64{}
	first, err := KVEntries(ctx, js, bucket, filter)
	if err != nil {
		return nil, err
	}
	for _, e := range first {
		seen[e.Key()] = e.Revision()
	}
	ctx, cancel := context.WithCancel(ctx)
	p := &kvPoll{updates: make(chan jetstream.KeyValueEntry, 64), cancel: cancel}
	go func() {
		defer close(p.updates)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
			es, err := KVEntries(rctx, js, bucket, filter)
			rcancel()
			if err != nil {
				continue
			}
			for _, e := range es {
				if e.Revision() <= seen[e.Key()] {
					continue
				}
				seen[e.Key()] = e.Revision()
				select {
				case p.updates <- e:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return p, nil
}

type kvPoll struct {
	updates chan jetstream.KeyValueEntry
	cancel  func()
}

func (p *kvPoll) Updates() <-chan jetstream.KeyValueEntry { return p.updates }
func (p *kvPoll) Stop() error                             { p.cancel(); return nil }

var _ jetstream.KeyWatcher = (*kvPoll)(nil)

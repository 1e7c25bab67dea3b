package events

import (
	"context"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

// KVPutSubject is the subject jetstream.KeyValue.Put publishes a key's new
// value on, for a bucket that is not a mirror: "$KV.<bucket>.<key>", behind
// the JetStream API prefix when the connection uses a domain or prefix.
//
// The projector and rebuild publish record writes themselves, through
// PublishMsgAsync with WithExpectLastSequencePerSubject, instead of calling
// kv.Update or kv.Put: those are synchronous (one round trip per record),
// and keeping many writes in flight is what lets a rebuild reach raw
// replay speed. This is the one place that knows the subject; a test
// checks it against what kv.Put stores.
func KVPutSubject(js interface {
	Options() jetstream.JetStreamOptions
}, bucket, key string) string {
	o := js.Options()
	pre := ""
	switch {
	case o.Domain != "":
		pre = "$JS." + o.Domain + ".API."
	case o.APIPrefix != "" && o.APIPrefix != jetstream.DefaultAPIPrefix:
		pre = strings.TrimSuffix(o.APIPrefix, ".") + "."
	}
	return pre + "$KV." + bucket + "." + key
}

// BucketKeys lists the keys of a bucket that match filter (a key pattern,
// ">" for all) from its stream's subject index: one stream info request
// (paged past 100,000 keys) and no consumer, so a reader that dies leaves
// nothing behind (a KV watch or ListKeys makes an ordered consumer).
// Deleted keys are listed too (a delete marker is a message on the key's
// subject): a Get of one finds nothing.
func BucketKeys(ctx context.Context, js interface {
	Stream(ctx context.Context, name string) (jetstream.Stream, error)
}, bucket, filter string) ([]string, error) {
	st, err := js.Stream(ctx, "KV_"+bucket)
	if err != nil {
		return nil, fmt.Errorf("opening bucket %s: %w", bucket, err)
	}
	pre := "$KV." + bucket + "."
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(pre+filter))
	if err != nil {
		return nil, fmt.Errorf("listing the keys of %s: %w", bucket, err)
	}
	keys := make([]string, 0, len(info.State.Subjects))
	for subj := range info.State.Subjects {
		keys = append(keys, strings.TrimPrefix(subj, pre))
	}
	return keys, nil
}

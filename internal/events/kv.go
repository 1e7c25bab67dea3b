package events

import (
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

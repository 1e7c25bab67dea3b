package origin_test

import (
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/origin"
)

func TestRequest(t *testing.T) {
	hdr := func(kv ...string) nats.Header {
		h := nats.Header{}
		for i := 0; i < len(kv); i += 2 {
			h.Set(kv[i], kv[i+1])
		}
		return h
	}
	for _, tc := range []struct {
		what  string
		reply string
		h     nats.Header
		ok    bool
	}{
		{"a client's request (default inbox)", "_INBOX.abc.1", nil, true},
		{"a client's request (its own prefix)", "_INBOX_VMHERD.operator.alice.abc.1", hdr("Vmherd-Tail", "10"), true},
		{"a consumer's delivery", "$JS.ACK.KV_VM_IMAGES.rm.1.2.3.4.0", nil, false},
		{"a flow-control request", "$JS.FC.KV_VM_IMAGES.rm.x", nil, false},
		{"a direct get's answer", "", hdr("Nats-Stream", "KV_VM_IMAGES", "Nats-Sequence", "3"), false},
		{"an answer (API or service)", "", nil, false},
		{"a status", "_INBOX.x", hdr("Status", "503"), false},
		{"a reply to another service", "vm.image.h1.rm", nil, false},
		{"a direct get's answer with an inbox reply", "_INBOX.x", hdr("Nats-Stream", "VM_EVENTS"), false},
	} {
		if err := origin.Request(tc.reply, tc.h); (err == nil) != tc.ok {
			t.Errorf("%s: Request = %v, want ok %v", tc.what, err, tc.ok)
		}
	}
	if origin.Relayed("_INBOX.x", nil) || !origin.Relayed("$JS.ACK.X.y.1.1.1.1.0", nil) {
		t.Error("Relayed")
	}
}

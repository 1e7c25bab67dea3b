package events_test

import (
	"context"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/natsserver"
)

// KVPutSubject names the subject kv.Put stores a key on, so the record
// writes that bypass kv.Put land where kv.Get reads.
func TestKVPutSubjectMatchesKVPut(t *testing.T) {
	ns, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", StoreDir: t.TempDir() + "/js", Sync: "default"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Stop)
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx := context.Background()
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "B"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "web1", []byte("x")); err != nil {
		t.Fatal(err)
	}
	st, _ := js.Stream(ctx, "KV_B")
	m, err := st.GetLastMsgForSubject(ctx, events.KVPutSubject(js, "B", "web1"))
	if err != nil || string(m.Data) != "x" {
		t.Fatalf("kv.Put's value is not on %s: %v", events.KVPutSubject(js, "B", "web1"), err)
	}
	// A write on the subject is what kv.Get reads.
	if _, err := js.Publish(ctx, events.KVPutSubject(js, "B", "web1"), []byte("y")); err != nil {
		t.Fatal(err)
	}
	if e, err := kv.Get(ctx, "web1"); err != nil || string(e.Value()) != "y" {
		t.Fatalf("kv.Get after a write on KVPutSubject: %v", err)
	}
	// Under a JetStream domain, kv.Put goes through the domain's API prefix.
	djs, _ := jetstream.NewWithDomain(nc, "hub")
	if got, want := events.KVPutSubject(djs, "B", "web1"), "$JS.hub.API.$KV.B.web1"; got != want {
		t.Fatalf("with domain: %s, want %s", got, want)
	}
	pjs, _ := jetstream.NewWithAPIPrefix(nc, "$JS.acct")
	if got, want := events.KVPutSubject(pjs, "B", "web1"), "$JS.acct.$KV.B.web1"; got != want {
		t.Fatalf("with API prefix: %s, want %s", got, want)
	}
}

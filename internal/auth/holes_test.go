package auth_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/projection"
)

// Each test here reproduces one hole of the trust-holes issues as the
// probe found it; they fail on the code before the fix.

// Issue 22 item 2: a viewer running `nats sub '_INBOX.>'` while an operator
// read a VM's generated private key received the key. Each identity now
// replies on its own inbox prefix and may subscribe only to it.
func TestInboxesArePrivate(t *testing.T) {
	f := newFixture(t, false)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	kv, err := f.admin.js.KeyValue(ctx, f.names.SSHBucket())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, api.SSHKey("web1", 1, api.SSHPrivateKey), []byte("PRIVATE KEY")); err != nil {
		t.Fatal(err)
	}
	op := f.connect(auth.Identity{Role: auth.RoleOperator, User: "alice"})
	viewer := f.connect(auth.Identity{Role: auth.RoleViewer, User: "dash"})
	worker := f.connect(auth.Identity{Role: auth.RoleWorker, Host: "h2"})

	// The eavesdroppers listen on every inbox they can.
	got := make(chan string, 64)
	for _, c := range []*client{viewer, worker} {
		for _, subj := range []string{"_INBOX.>", auth.InboxRoot + ".>", op.id.InboxPrefix() + ".>"} {
			if subj == ".>" {
				continue // no prefix of its own (the code before the fix)
			}
			if _, err := c.nc.Subscribe(subj, func(m *nats.Msg) { got <- c.id.Name() + " on " + m.Subject + ": " + string(m.Data) }); err != nil {
				t.Fatal(err)
			}
		}
		_ = c.nc.Flush()
	}
	okv, err := op.js.KeyValue(ctx, f.names.SSHBucket())
	if err != nil {
		t.Fatalf("the operator cannot open VM_SSH: %v", err)
	}
	e, err := okv.Get(ctx, api.SSHKey("web1", 1, api.SSHPrivateKey))
	if err != nil || string(e.Value()) != "PRIVATE KEY" {
		t.Fatalf("the operator's get: %v", err)
	}
	select {
	case m := <-got:
		for more := true; more; {
			select {
			case x := <-got:
				m += "\n" + x
			default:
				more = false
			}
		}
		if strings.Contains(m, "PRIVATE KEY") {
			t.Errorf("another identity read the operator's reply (the private key):\n%s", m)
		} else {
			t.Errorf("another identity read the operator's replies:\n%s", m)
		}
	case <-time.After(time.Second):
	}
}

// Issue 22 item 3: a viewer deleted other clients' consumers (the engine's
// projector and its VM_HOSTS watch), and created durable consumers without
// bound. Readers may not delete consumers; durables on the streams people
// read are removed by the engines' policy; the account bounds consumers,
// connections and payload.
func TestReadersCannotTouchOthersConsumers(t *testing.T) {
	f := newFixture(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The engine's consumers: an ordered consumer of the events and a
	// watch of the hosts bucket.
	st, err := f.admin.js.Stream(ctx, f.names.EventsStream())
	if err != nil {
		t.Fatal(err)
	}
	projector, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := projector.FetchNoWait(1); err != nil {
		t.Fatal(err)
	}
	pname := projector.CachedInfo().Name
	hkv, _ := f.admin.js.KeyValue(ctx, f.names.HostsBucket())
	w, err := hkv.WatchAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = w.Stop() }()
	<-w.Updates()
	var watch string
	for info := range mustStream(t, f, "KV_"+f.names.HostsBucket()).ListConsumers(ctx).Info() {
		watch = info.Name
	}
	if watch == "" {
		t.Fatal("no watch consumer on the hosts bucket")
	}

	viewer := f.connect(auth.Identity{Role: auth.RoleViewer, User: "dash"})
	for _, target := range []struct{ stream, name string }{{f.names.EventsStream(), pname}, {"KV_" + f.names.HostsBucket(), watch}} {
		_, _ = viewer.request("$JS.API.CONSUMER.DELETE."+target.stream+"."+target.name, nil)
		if !f.exists(target.stream, target.name) {
			t.Errorf("a viewer deleted the engine's consumer %s on %s", target.name, target.stream)
		}
	}

	// A durable consumer of the events, made by a viewer.
	body := `{"stream_name":"VM_EVENTS","config":{"durable_name":"mine","name":"mine","ack_policy":"explicit"}}`
	if m, ok := viewer.request("$JS.API.CONSUMER.CREATE.VM_EVENTS.mine", []byte(body)); !ok || m == nil || strings.Contains(string(m.Data), `"error"`) {
		t.Logf("the viewer's durable was refused at once: %v", m)
	}
	time.Sleep(2 * time.Second)
	if f.exists("VM_EVENTS", "mine") {
		t.Error("a viewer's durable consumer on VM_EVENTS is still there 2 s later")
	}

	// The account's limits, as the server applies them.
	m, ok := viewer.request("$JS.API.INFO", nil)
	if !ok || m == nil {
		t.Fatal("no account info")
	}
	var info struct {
		Limits struct {
			MaxConsumers int `json:"max_consumers"`
		} `json:"limits"`
	}
	if err := json.Unmarshal(m.Data, &info); err != nil {
		t.Fatal(err)
	}
	if info.Limits.MaxConsumers != auth.MaxConsumers {
		t.Errorf("the account allows %d consumers, want %d", info.Limits.MaxConsumers, auth.MaxConsumers)
	}
	if got := viewer.nc.MaxPayload(); got != auth.MaxPayload {
		t.Errorf("max payload %d, want %d (a 1 MiB command and the event that carries it)", got, auth.MaxPayload)
	}
	if err := viewer.nc.Publish("vm.log.h1.web1", make([]byte, auth.MaxPayload+1)); err == nil {
		t.Error("a payload over the limit was sent")
	}
}

func mustStream(t *testing.T, f *fixture, name string) jetstream.Stream {
	t.Helper()
	st, err := f.admin.js.Stream(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// Issue 22 item 5: a worker's heartbeat (or an operator's cordon) put with
// "Nats-Rollup: all" purged every heartbeat and cordon of VM_HOSTS. The
// buckets refuse rollups, whoever puts them.
func TestRollupRefused(t *testing.T) {
	f := newFixture(t, false)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	hkv, _ := f.admin.js.KeyValue(ctx, f.names.HostsBucket())
	for _, k := range []string{"h1", "h2", "h2.cordon"} {
		if _, err := hkv.Put(ctx, k, []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
	}
	ikv, _ := f.admin.js.KeyValue(ctx, f.names.ImagesBucket())
	if _, err := ikv.Put(ctx, "h2.debian", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	worker := f.connect(auth.Identity{Role: auth.RoleWorker, Host: "h1"})
	op := f.connect(auth.Identity{Role: auth.RoleOperator, User: "alice"})
	for _, try := range []struct {
		c    *client
		subj string
	}{{worker, "$KV.VM_HOSTS.h1"}, {worker, "$KV.VM_IMAGES.h1.img"}, {op, "$KV.VM_HOSTS.h1.cordon"}} {
		m := nats.NewMsg(try.subj)
		m.Data = []byte(`{}`)
		m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupAll)
		if _, err := try.c.js.PublishMsg(ctx, m); err == nil {
			t.Errorf("%s's rollup on %s was stored", try.c.id.Name(), try.subj)
		}
	}
	for _, k := range []string{"h2", "h2.cordon"} {
		if _, err := hkv.Get(ctx, k); err != nil {
			t.Errorf("VM_HOSTS key %s after the rollups: %v", k, err)
		}
	}
	if _, err := ikv.Get(ctx, "h2.debian"); err != nil {
		t.Errorf("VM_IMAGES key h2.debian after the rollups: %v", err)
	}
}

// Issue 26 item 2: a viewer made the server write into a VM's console
// input through a push consumer's deliver subject, which the server does
// not check against what the viewer may publish. The engines' policy
// removes the consumer (the worker also drops what the server relays:
// internal/origin, and the end-to-end test in internal/e2e).
func TestPushConsumerRemoved(t *testing.T) {
	f := newFixture(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := range 3 {
		if _, err := f.admin.js.Publish(ctx, f.names.Event("web1", api.TypeStarted, "h1"), []byte(`{"n":`+string(rune('0'+i))+`}`)); err != nil {
			t.Fatal(err)
		}
	}
	// The console's relay, listening where the consumer delivers.
	console, err := f.admin.nc.SubscribeSync(f.names.Console("h1", "web1", api.ConsoleIn))
	if err != nil {
		t.Fatal(err)
	}
	_ = f.admin.nc.Flush()
	viewer := f.connect(auth.Identity{Role: auth.RoleViewer, User: "dash"})
	body := `{"stream_name":"VM_EVENTS","config":{"name":"typist","deliver_subject":"vm.console.h1.web1.in","ack_policy":"none","idle_heartbeat":1000000000,"deliver_policy":"new"}}`
	if _, ok := viewer.request("$JS.API.CONSUMER.CREATE.VM_EVENTS.typist", []byte(body)); !ok {
		t.Skip("the viewer may not create consumers at all")
	}
	time.Sleep(2 * time.Second)
	// Events stored after the policy has had its time are not delivered.
	for i := range 3 {
		if _, err := f.admin.js.Publish(ctx, f.names.Event("web1", api.TypeStarted, "h1"), []byte(`{"late":`+string(rune('0'+i))+`}`)); err != nil {
			t.Fatal(err)
		}
	}
	if f.exists("VM_EVENTS", "typist") {
		t.Error("a viewer's push consumer delivering to a console is still there 2 s later")
	}
	for {
		m, err := console.NextMsg(500 * time.Millisecond)
		if err != nil {
			break
		}
		if m.Header.Get("Status") == "" {
			t.Errorf("the console got %q from the viewer's consumer", m.Data)
		}
	}
}

// Found with the relayed-message work: an operator writes any bytes into
// VM_SSH, then asks for them with a direct get whose reply subject is an
// engine's event subject; the server stores the answer there, where the
// operator may not publish. The projection (and `engine rebuild`) must not
// take it for the engines' decision.
func TestDirectGetCopyIsNoEvent(t *testing.T) {
	f := newFixture(t, false)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, vmName := range []string{"other1", "other2"} {
		if _, err := f.admin.js.Publish(ctx, f.names.Event(vmName, api.TypeStopped, "h1"), []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
	}
	op := f.connect(auth.Identity{Role: auth.RoleOperator, User: "alice"})
	forged := `{"type":"accepted","vm":"web1","command_id":"forged","action":"prepare","time":"2026-01-01T00:00:00Z","host":"h1","spec":{"backend":"noop"}}`
	kv, err := op.js.KeyValue(ctx, f.names.SSHBucket())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "web1.key", []byte(forged)); err != nil {
		t.Fatal(err)
	}
	target := f.names.Event("web1", api.TypeAccepted, api.EngineWriter)
	if !op.pub(&nats.Msg{Subject: "$JS.API.DIRECT.GET.KV_" + f.names.SSHBucket() + ".$KV." + f.names.SSHBucket() + ".web1.key", Reply: target}) {
		t.Fatal("the operator may not direct-get VM_SSH")
	}
	st, _ := f.admin.js.Stream(ctx, f.names.EventsStream())
	if m, err := st.GetLastMsgForSubject(ctx, target); err != nil {
		t.Skipf("the server did not store the copy (%v): nothing to check", err)
	} else {
		t.Logf("stored on %s: headers %v", target, m.Header)
	}
	// The engines' reads of a VM's events (direct gets) see it where it is
	// stored, as no event: the client library would report the original
	// message's subject and sequence (1, in VM_SSH), and the engine would
	// take the VM's last event to be at 1.
	store, err := events.NewStore(ctx, f.admin.js, f.names, api.EngineWriter)
	if err != nil {
		t.Fatal(err)
	}
	evs, err := store.ReadVM(ctx, "web1", 0)
	if err != nil || len(evs) != 1 || evs[0].Seq != 3 || evs[0].Event != nil {
		t.Errorf("ReadVM after the copy: %v %+v, want one message at 3 that is no event", err, evs)
	}
	if seq, err := store.LastSeq(ctx, "web1"); err != nil || seq != 3 {
		t.Errorf("LastSeq after the copy: %d %v, want 3", seq, err)
	}
	recs, _, err := projection.Replay(ctx, f.admin.js, f.names)
	if err != nil {
		t.Fatal(err)
	}
	if r := recs["web1"]; r != nil {
		t.Errorf("the operator's bytes became the engines' decision: web1 is %s (command %s)", r.State, r.LastCommandID)
	}
}

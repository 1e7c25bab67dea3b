package jspolicy_test

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/jspolicy"
	"github.com/vmherd/vmherd/internal/natsserver"
)

func TestViolation(t *testing.T) {
	n := api.DefaultNames
	for _, tc := range []struct {
		stream string
		cfg    jetstream.ConsumerConfig
		bad    bool
	}{
		{"VM_EVENTS", jetstream.ConsumerConfig{InactiveThreshold: 5 * time.Minute}, false},                                               // an ordered consumer
		{"KV_VM_HOSTS", jetstream.ConsumerConfig{DeliverSubject: "_INBOX_VMHERD.engine.e.x", InactiveThreshold: 5 * time.Second}, false}, // a KV watch
		{"KV_VM_HOSTS", jetstream.ConsumerConfig{DeliverSubject: "_INBOX.abc", InactiveThreshold: 5 * time.Second}, false},
		{"VM_EVENTS", jetstream.ConsumerConfig{DeliverSubject: "vm.console.h1.web1.in", InactiveThreshold: 5 * time.Second}, true},
		{"VM_COMMANDS", jetstream.ConsumerConfig{DeliverSubject: "vm.image.h1.rm"}, true},
		{"VM_EVENTS", jetstream.ConsumerConfig{Durable: "mine"}, true},
		{"KV_VM_SSH", jetstream.ConsumerConfig{InactiveThreshold: 24 * time.Hour}, true},
		{"VM_EVENTS", jetstream.ConsumerConfig{}, true}, // never expires
		{"VM_COMMANDS", jetstream.ConsumerConfig{Durable: "engine"}, false},
		{"VM_TASKS", jetstream.ConsumerConfig{Durable: "worker-h1"}, false},
	} {
		if got := jspolicy.Violation(n, tc.stream, tc.cfg) != ""; got != tc.bad {
			t.Errorf("%s %+v: violation %v, want %v", tc.stream, tc.cfg, got, tc.bad)
		}
	}
}

// The policy deletes what breaks it, and a forged audit advisory naming a
// consumer that does not break it deletes nothing: the configuration is
// read from the server.
func TestEnforcer(t *testing.T) {
	ns, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", StoreDir: t.TempDir(), Sync: "default"})
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n := api.DefaultNames
	if err := jsetup.Ensure(ctx, js, n, jsetup.DefaultSettings); err != nil {
		t.Fatal(err)
	}
	// Made before the enforcer runs: the sweep at start finds it.
	if _, err := js.CreateOrUpdateConsumer(ctx, n.EventsStream(), jetstream.ConsumerConfig{Durable: "early"}); err != nil {
		t.Fatal(err)
	}
	ectx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = (&jspolicy.Enforcer{JS: js, Names: n, Log: slog.New(slog.DiscardHandler)}).Run(ectx)
	}()
	defer func() { stop(); <-done }()

	if _, err := js.CreateConsumer(ctx, n.EventsStream(), jetstream.ConsumerConfig{Name: "ordered", InactiveThreshold: time.Minute}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateConsumer(ctx, n.EventsStream(), jetstream.ConsumerConfig{Name: "typist", DeliverSubject: "vm.console.h1.web1.in"}); err != nil {
		t.Fatal(err)
	}
	forged := `{"type":"io.nats.jetstream.advisory.v1.api_audit","subject":"$JS.API.CONSUMER.CREATE.VM_EVENTS.ordered",` +
		`"response":"{\"stream_name\":\"VM_EVENTS\",\"name\":\"ordered\",\"config\":{\"deliver_subject\":\"vm.console.h1.web1.in\"}}"}`
	if err := nc.Publish(jspolicy.Audit, []byte(forged)); err != nil {
		t.Fatal(err)
	}
	gone := func(name string) bool {
		_, err := js.Consumer(ctx, n.EventsStream(), name)
		return errors.Is(err, jetstream.ErrConsumerNotFound)
	}
	for deadline := time.Now().Add(5 * time.Second); !gone("typist") || !gone("early"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("still there after 5 s: typist gone %v, early gone %v", gone("typist"), gone("early"))
		}
	}
	time.Sleep(200 * time.Millisecond)
	if gone("ordered") {
		t.Error("a forged advisory got a consumer that keeps the policy deleted")
	}
}

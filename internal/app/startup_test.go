package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/natsserver"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
)

// bareServer is an embedded server with JetStream and no vmherd streams.
func bareServer(t *testing.T) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	ns, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", StoreDir: t.TempDir() + "/js", Sync: "default"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Stop)
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// A worker started before any engine waits for the engine's streams,
// saying what it waits for, and never creates or changes them: the
// settings the engine chose survive a worker with other defaults.
func TestWorkerWaitsForAndNeverChangesStreams(t *testing.T) {
	nc, js := bareServer(t)
	var logs syncbuf.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	wo := WorkerOptions{Host: "h1", Backends: "noop", DataDir: t.TempDir()}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := wo.NewWorker(ctx, Connected{NC: nc, JS: js}, api.DefaultNames, log)
		done <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), "stream VM_TASKS does not exist") {
		if time.Now().After(deadline) {
			t.Fatalf("the worker does not say what it waits for:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, name := range []string{"VM_COMMANDS", "VM_EVENTS", "VM_TASKS"} {
		if _, err := js.Stream(ctx, name); !errors.Is(err, jetstream.ErrStreamNotFound) {
			t.Fatalf("the worker created %s: %v", name, err)
		}
	}
	// The engine creates them with settings of its own.
	engineSettings := jsetup.Settings{Replicas: 1, CommandsMaxAge: time.Hour, DuplicateWindow: 7 * time.Minute}
	if err := jsetup.Ensure(ctx, js, api.DefaultNames, engineSettings); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("worker after the streams appeared: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("worker still waiting after the streams appeared")
	}
	if !strings.Contains(logs.String(), "ready after waiting") {
		t.Errorf("no log of the end of the wait:\n%s", logs.String())
	}
	for name, want := range map[string]time.Duration{"VM_EVENTS": 7 * time.Minute, "VM_TASKS": 7 * time.Minute} {
		st, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.CachedInfo().Config.Duplicates; got != want {
			t.Errorf("%s duplicate window %s after a worker started, the engine set %s", name, got, want)
		}
	}
	st, _ := js.Stream(ctx, "VM_COMMANDS")
	if got := st.CachedInfo().Config.MaxAge; got != time.Hour {
		t.Errorf("VM_COMMANDS max age %s after a worker started, the engine set 1h", got)
	}
}

func TestCheckNamesEachProblem(t *testing.T) {
	_, js := bareServer(t)
	ctx := context.Background()
	err := jsetup.Check(ctx, js, api.DefaultNames)
	var nr *jsetup.NotReadyError
	want := len(jsetup.StreamConfigs(api.DefaultNames, jsetup.DefaultSettings)) + len(jsetup.BucketConfigs(api.DefaultNames, jsetup.DefaultSettings))
	if !errors.As(err, &nr) || len(nr.Problems) != want {
		t.Fatalf("Check on an empty server: %v", err)
	}
	if err := jsetup.Ensure(ctx, js, api.DefaultNames, jsetup.DefaultSettings); err != nil {
		t.Fatal(err)
	}
	if err := jsetup.Check(ctx, js, api.DefaultNames); err != nil {
		t.Fatalf("Check after Ensure: %v", err)
	}
	// A tasks stream that is not a work queue is named as such.
	other := api.Names{Prefix: "x"}
	for _, cfg := range jsetup.StreamConfigs(other, jsetup.DefaultSettings) {
		if cfg.Name == other.TasksStream() {
			cfg.Retention = jetstream.LimitsPolicy
		}
		if _, err := js.CreateStream(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}
	for _, cfg := range jsetup.BucketConfigs(other, jsetup.DefaultSettings) {
		if _, err := js.CreateKeyValue(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}
	err = jsetup.Check(ctx, js, other)
	if !errors.As(err, &nr) || len(nr.Problems) != 1 || !strings.Contains(err.Error(), "X_TASKS has retention Limits, vmherd needs WorkQueue") {
		t.Fatalf("Check with a limits tasks stream: %v", err)
	}
}

func TestTransient(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{&jetstream.APIError{Code: 503, ErrorCode: 10023, Description: "insufficient resources"}, true},
		{&jetstream.APIError{Code: 503, Description: "JetStream system temporarily unavailable"}, true},
		{&jetstream.APIError{Code: 400, ErrorCode: 10005, Description: "no suitable peers for placement"}, true},
		{fmt.Errorf("creating: %w", context.DeadlineExceeded), true},
		{nats.ErrNoResponders, true},
		{&jsetup.NotReadyError{Problems: []string{"x"}}, true},
		{&jetstream.APIError{Code: 400, ErrorCode: jetstream.JSErrCodeStreamNameInUse, Description: "stream name already in use"}, false},
		{errors.New("bad config"), false},
	} {
		if got := jsetup.Transient(c.err); got != c.want {
			t.Errorf("Transient(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

package engine_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/testenv"
)

// Restarting a single host (its engine and its worker down together for
// longer than the host timeout) adds no host_lost/host_back pair: a new
// engine judges no host lost before it has watched for a whole host
// timeout. A host that stops beating afterwards is still reported lost.
func TestRestartAddsNoHostEvents(t *testing.T) {
	t.Parallel()
	const lostAfter = 3 * time.Second
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{HostLostAfter: lostAfter})
	w := env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(eng, "h1")
	if err := eng.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := w.Stop(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(lostAfter + time.Second) // the host's last beat is stale now
	eng = env.StartEngine(testenv.EngineConfig{ID: "e2", HostLostAfter: lostAfter})
	// The worker's first beat comes a while after the engine is up (the
	// embedded server recovers its streams, the worker reconnects).
	time.Sleep(lostAfter / 2)
	w = env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(eng, "h1")
	time.Sleep(2*lostAfter + time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := env.JS.Stream(ctx, env.Names.EventsStream())
	if err != nil {
		t.Fatal(err)
	}
	hostEvent := func(kind api.HostEventType) bool {
		_, err := st.GetLastMsgForSubject(ctx, env.Names.HostEvent("h1", kind))
		if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			t.Fatal(err)
		}
		return err == nil
	}
	if hostEvent(api.HostLost) || hostEvent(api.HostBack) {
		t.Fatalf("a restart of the host's engine and worker added host events: lost %v, back %v", hostEvent(api.HostLost), hostEvent(api.HostBack))
	}
	if err := w.Stop(); err != nil {
		t.Fatal(err)
	}
	env.WaitFor("h1 reported lost once its worker stopped", 10*lostAfter, func() bool { return hostEvent(api.HostLost) })
}

package sshkeys_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/testenv"
)

// What was destroyed while no engine ran is swept when one starts; a
// destroyed forged by another host's worker deletes nothing; entries of
// a name without a record, or of the next incarnation, are kept.
func TestSweepAtStartAndForgedDestroy(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(eng, "h1")
	noop := &api.VmSpec{Backend: api.BackendNoop}
	env.SendCmd("old", "prepare", "p-old", api.Command{Spec: noop})
	env.Result("old", "p-old", 10*time.Second)
	env.SendCmd("live", "prepare", "p-live", api.Command{Spec: noop})
	env.Result("live", "p-live", 10*time.Second)
	env.SendCmd("old", "destroy", "d-old", api.Command{})
	env.Result("old", "d-old", 10*time.Second)
	env.CheckProjection(10 * time.Second)
	if err := eng.Stop(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	kv, err := env.JS.KeyValue(ctx, env.Names.SSHBucket())
	if err != nil {
		t.Fatal(err)
	}
	gone := []string{"old.1.key", "old.1.hostkeys", "old.1.provision", "old.key"}
	kept := []string{"live.1.key", "live.1.provision", "live.2.key", "ghost.1.key", "live.key", "live.0.key"}
	for _, k := range append(append([]string{}, gone...), kept...) {
		if _, err := kv.Put(ctx, k, []byte("secret")); err != nil {
			t.Fatal(err)
		}
	}
	has := func(k string) bool {
		_, err := kv.Get(ctx, k)
		if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			t.Fatal(err)
		}
		return err == nil
	}
	eng = env.StartEngine(testenv.EngineConfig{})
	env.WaitFor("the stale entries swept at start", 10*time.Second, func() bool {
		for _, k := range gone {
			if has(k) {
				return false
			}
		}
		return true
	})
	// A destroyed about h1's VM on h2's own writer token: stored, and the
	// record (and so VM_SSH) does not move.
	forged := api.Event{Type: api.TypeDestroyed, VM: "live", CommandID: "forged", Action: "destroy",
		Time: time.Now().UTC(), Host: "h1", State: api.StateDestroyed}
	if _, err := env.JS.Publish(ctx, env.Names.Event("live", api.TypeDestroyed, "h2"), forged.Encode()); err != nil {
		t.Fatal(err)
	}
	// A real destroy of another VM after it, so the sweeper has caught up.
	env.SendCmd("other", "prepare", "p-other", api.Command{Spec: noop})
	env.Result("other", "p-other", 10*time.Second)
	if _, err := kv.Put(ctx, "other.1.key", []byte("secret")); err != nil {
		t.Fatal(err)
	}
	env.SendCmd("other", "destroy", "d-other", api.Command{})
	env.Result("other", "d-other", 10*time.Second)
	env.WaitFor("other's key swept", 10*time.Second, func() bool { return !has("other.1.key") })
	for _, k := range kept {
		if !has(k) {
			t.Errorf("%s was deleted", k)
		}
	}
}

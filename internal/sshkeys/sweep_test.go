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

// A purge sweeps every incarnation's entries written before it, whether
// the sweeper sees the purge as it happens or finds its marker at start
// (the destroyed record it missed is gone by then); an entry written
// after the purge (vmctl up's key for the new incarnation) is kept.
func TestSweepAfterPurge(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(eng, "h1")
	ctx := context.Background()
	kv, err := env.JS.KeyValue(ctx, env.Names.SSHBucket())
	if err != nil {
		t.Fatal(err)
	}
	has := func(k string) bool {
		_, err := kv.Get(ctx, k)
		if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			t.Fatal(err)
		}
		return err == nil
	}
	put := func(ks ...string) {
		for _, k := range ks {
			if _, err := kv.Put(ctx, k, []byte("secret")); err != nil {
				t.Fatal(err)
			}
		}
	}
	noop := &api.VmSpec{Backend: api.BackendNoop}
	lifeAndPurge := func(vm string) {
		env.SendCmd(vm, "prepare", "p-"+vm, api.Command{Spec: noop})
		env.Result(vm, "p-"+vm, 10*time.Second)
		env.SendCmd(vm, "destroy", "d-"+vm, api.Command{})
		env.Result(vm, "d-"+vm, 10*time.Second)
		env.SendCmd(vm, "purge", "pg-"+vm, api.Command{})
		records, err := env.JS.KeyValue(ctx, env.Names.RecordsBucket())
		if err != nil {
			t.Fatal(err)
		}
		env.WaitFor(vm+"'s record deleted", 10*time.Second, func() bool {
			_, err := records.Get(ctx, vm)
			return errors.Is(err, jetstream.ErrKeyNotFound)
		})
	}

	// Seen as it happens: entries left over from earlier incarnations
	// (as if the sweeper had missed their destroys) go with the purge.
	put("a.1.key", "a.1.hostkeys", "a.3.key")
	lifeAndPurge("a")
	env.WaitFor("a's entries swept by its purge", 10*time.Second, func() bool { return !has("a.1.key") && !has("a.1.hostkeys") && !has("a.3.key") })

	// Found at start: b lives, dies and is purged under an engine without
	// its sweeper (as if the sweeper were down throughout); an entry is
	// then written for b's next incarnation (vmctl up's key) before an
	// engine with its sweeper starts. The start-up pass finds b's record
	// deleted: it sweeps what was written before the purge, keeps the rest.
	if err := eng.Stop(); err != nil {
		t.Fatal(err)
	}
	eng = env.StartEngine(testenv.EngineConfig{ID: "e2", NoSweeper: true})
	env.WaitHost(eng, "h1")
	put("b.1.key", "b.1.hostkeys")
	lifeAndPurge("b")
	if err := eng.Stop(); err != nil {
		t.Fatal(err)
	}
	put("b.1.provision")
	eng = env.StartEngine(testenv.EngineConfig{ID: "e3"})
	env.WaitHost(eng, "h1")
	env.WaitFor("b's entries from before its purge swept at start", 10*time.Second, func() bool { return !has("b.1.key") && !has("b.1.hostkeys") })
	if !has("b.1.provision") {
		t.Error("an entry written after b's purge was deleted")
	}
}

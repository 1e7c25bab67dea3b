package projection

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/jsetup"
	"github.com/vmherd/vmherd/internal/natsserver"
)

// A projector's record writes meet a purge (another projector, further
// on, folded it and deleted the key): one that is behind the VM's
// events does not write its older record back (it will fold the purge
// itself); one that has folded the VM's last event writes its record; a
// delete of a key already deleted writes nothing. Tested on resolve, the
// conflict path every such write takes, against a real server.
func TestResolveAfterPurge(t *testing.T) {
	js, store := purgeServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n := api.DefaultNames
	kv, err := js.KeyValue(ctx, n.RecordsBucket())
	if err != nil {
		t.Fatal(err)
	}
	p := &Projector{JS: js, Names: n, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), kv: kv}

	// v's events: prepared, destroyed, then its purge (the last).
	var seqs []uint64
	for _, ev := range []api.Event{
		{Type: api.TypeAccepted, VM: "v", CommandID: "c1", Action: fsm.ActPrepare, Host: "h1", State: api.StatePreparing},
		{Type: api.TypeAccepted, VM: "v", CommandID: "c2", Action: fsm.ActPurge, Host: "h1", State: api.StateDestroyed},
	} {
		seq, _, err := store.Append(ctx, &ev, events.NoExpect, "")
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, seq)
	}
	// The engine's work after storing the purge: the VM's events before it
	// go, so the purge is its first event left.
	st, err := js.Stream(ctx, n.EventsStream())
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Purge(ctx, jetstream.WithPurgeSubject(n.VMEvents("v")), jetstream.WithPurgeSequence(seqs[1])); err != nil {
		t.Fatal(err)
	}
	// The key, written and then deleted (the further projector's work).
	rev, err := kv.Create(ctx, "v", (&api.VmRecord{Name: "v", State: api.StatePreparing, LastSeq: seqs[0]}).Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "v", jetstream.LastRevision(rev)); err != nil {
		t.Fatal(err)
	}

	stale := &cached{rec: &api.VmRecord{Name: "v", State: api.StatePreparing, LastSeq: seqs[0]}, rev: rev, pending: []uint64{seqs[0]}}
	got, covered, err := p.resolve(ctx, "v", stale)
	if err != nil || got != 0 || covered != 1 {
		t.Fatalf("resolve of a record behind the purge = %d, %d, %v", got, covered, err)
	}
	if _, err := kv.Get(ctx, "v"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("a record behind the purge was written back: %v", err)
	}

	// The same while the purge's removal of the earlier events is still
	// pending (or its engine died before it): u's prepare is still there.
	var useqs []uint64
	for _, ev := range []api.Event{
		{Type: api.TypeAccepted, VM: "u", CommandID: "u1", Action: fsm.ActPrepare, Host: "h1", State: api.StatePreparing},
		{Type: api.TypeAccepted, VM: "u", CommandID: "u2", Action: fsm.ActPurge, Host: "h1", State: api.StateDestroyed},
	} {
		seq, _, err := store.Append(ctx, &ev, events.NoExpect, "")
		if err != nil {
			t.Fatal(err)
		}
		useqs = append(useqs, seq)
	}
	urev, err := kv.Create(ctx, "u", (&api.VmRecord{Name: "u", State: api.StatePreparing, LastSeq: useqs[0]}).Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "u", jetstream.LastRevision(urev)); err != nil {
		t.Fatal(err)
	}
	ustale := &cached{rec: &api.VmRecord{Name: "u", State: api.StatePreparing, LastSeq: useqs[0]}, rev: urev, pending: []uint64{useqs[0]}}
	if got, covered, err := p.resolve(ctx, "u", ustale); err != nil || got != 0 || covered != 1 {
		t.Fatalf("resolve of a record behind a purge whose removal is pending = %d, %d, %v", got, covered, err)
	}
	if _, err := kv.Get(ctx, "u"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("a record behind a pending purge was written back: %v", err)
	}

	gone := &cached{rec: Fold(nil, &api.Event{Type: api.TypeAccepted, VM: "v", CommandID: "c2", Action: fsm.ActPurge}, seqs[1]), rev: rev, pending: []uint64{seqs[1]}}
	if got, covered, err := p.resolve(ctx, "v", gone); err != nil || got != 0 || covered != 1 {
		t.Fatalf("resolve of the purge's fold on a deleted key = %d, %d, %v", got, covered, err)
	}

	// A record of the new incarnation (a prepare after the purge) is
	// written, even when a later event of the VM is stored already (its
	// result): a projector that restarts past the prepare must find it.
	seq3, _, err := store.Append(ctx, &api.Event{Type: api.TypeAccepted, VM: "v", CommandID: "c3", Action: fsm.ActPrepare, Host: "h1", State: api.StatePreparing}, events.NoExpect, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := store.Append(ctx, &api.Event{Type: api.TypeRejected, VM: "v", CommandID: "c3b", Action: fsm.ActStart, State: api.StatePreparing, Reason: "in flight"}, events.NoExpect, ""); err != nil {
		t.Fatal(err)
	}
	fresh := &cached{rec: &api.VmRecord{Name: "v", State: api.StatePreparing, Generation: 1, LastSeq: seq3}, pending: []uint64{seq3}}
	got, _, err = p.resolve(ctx, "v", fresh)
	if err != nil || got == 0 {
		t.Fatalf("resolve of the new incarnation = %d, %v", got, err)
	}
	e, err := kv.Get(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if r, _ := api.UnmarshalRecord(e.Value()); r.LastSeq != seq3 {
		t.Fatalf("the new incarnation's record: %s", e.Value())
	}

	// And the purge of it, through write: a delete at its revision,
	// whose marker's revision comes back for the next write.
	del, err := p.write(ctx, "v", Fold(nil, &api.Event{Type: api.TypeAccepted, VM: "v", CommandID: "c4", Action: fsm.ActPurge}, seq3+2), e.Revision())
	if err != nil || del <= e.Revision() {
		t.Fatalf("write of a purge's fold = %d, %v", del, err)
	}
	if _, err := kv.Get(ctx, "v"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("the key after the purge's write: %v", err)
	}
	if _, err := kv.Update(ctx, "v", []byte(`{}`), del); err != nil {
		t.Fatalf("the delete marker's revision does not take the next write: %v", err)
	}
}

// A rebuild gives a purged VM's key its delete marker back (what the
// engines' start-up purge check and the key sweeper find purged names
// by), and none to a name with only rejections.
func TestRebuildKeepsPurgeMarkers(t *testing.T) {
	js, store := purgeServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n := api.DefaultNames
	for _, ev := range []api.Event{
		{Type: api.TypeAccepted, VM: "gone", CommandID: "g1", Action: fsm.ActPrepare, Host: "h1", State: api.StatePreparing},
		{Type: api.TypeAccepted, VM: "gone", CommandID: "g2", Action: fsm.ActPurge, Host: "h1", State: api.StateDestroyed},
		{Type: api.TypeRejected, VM: "never", CommandID: "n1", Action: fsm.ActStart, Reason: "no vm never"},
		{Type: api.TypeAccepted, VM: "here", CommandID: "h1", Action: fsm.ActPrepare, Host: "h1", State: api.StatePreparing},
	} {
		if _, _, err := store.Append(ctx, &ev, events.NoExpect, ""); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := Rebuild(ctx, js, n, jsetup.DefaultSettings); err != nil {
		t.Fatal(err)
	}
	deleted, err := events.KVDeleted(ctx, js, n.RecordsBucket(), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(deleted) != 1 || deleted[0] != "gone" {
		t.Fatalf("deleted keys after a rebuild: %v, want [gone]", deleted)
	}
	recs, err := Load(ctx, js, n)
	if err != nil || len(recs) != 1 || recs["here"] == nil {
		t.Fatalf("records after a rebuild: %v, %v", recs, err)
	}
}

// purgeServer starts an embedded NATS server with vmherd's streams and
// buckets and returns JetStream on it and an engine's event store.
func purgeServer(t *testing.T) (jetstream.JetStream, *events.Store) {
	t.Helper()
	ns, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", StoreDir: t.TempDir()})
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := jsetup.Ensure(ctx, js, api.DefaultNames, jsetup.DefaultSettings); err != nil {
		t.Fatal(err)
	}
	store, err := events.NewStore(ctx, js, api.DefaultNames, api.EngineWriter)
	if err != nil {
		t.Fatal(err)
	}
	return js, store
}

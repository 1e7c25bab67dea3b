package projection_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/testenv"
)

// appendLifecycles appends, for each of vms VMs, the events of a prepare,
// start and stop, interleaved across VMs, as fast as the server takes them.
func appendLifecycles(t *testing.T, env *testenv.Env, vms int, gen string) {
	t.Helper()
	ctx := context.Background()
	steps := []struct {
		action string
		result api.EventType
		state  api.VmState
	}{
		{"prepare", api.TypePrepared, api.StatePrepared},
		{"start", api.TypeStarted, api.StateRunning},
		{"stop", api.TypeStopped, api.StateStopped},
	}
	for si, s := range steps {
		for _, typ := range []api.EventType{api.TypeAccepted, s.result} {
			for i := range vms {
				name := fmt.Sprintf("v%03d", i)
				ev := &api.Event{Type: typ, VM: name, CommandID: gen + "-" + strconv.Itoa(si), Action: fsm.Action(s.action),
					Time: time.Now().UTC(), Host: "h1", Backend: api.BackendNoop}
				if typ != api.TypeAccepted {
					ev.State = s.state
					ev.Handle = &api.VmHandle{ID: gen, Name: name, Backend: api.BackendNoop, Host: "h1", PID: 100 + si}
				}
				writer := api.EngineWriter
				if typ != api.TypeAccepted {
					writer = "h1"
				}
				if _, err := env.JS.PublishAsync(env.Names.Event(name, typ, writer), ev.Encode()); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	select {
	case <-env.JS.PublishAsyncComplete():
	case <-ctx.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("publishes not acknowledged")
	}
}

func lastSeq(t *testing.T, env *testenv.Env) uint64 {
	t.Helper()
	info, err := env.Store.Stream().Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.LastSeq
}

// Records written by projectors with pipelined writes equal a replay of the
// stream, also with two projectors writing the same bucket, and the
// checkpoint names only what is stored.
func TestProjectorsConvergeOnReplay(t *testing.T) {
	env := testenv.New(t)
	dir := t.TempDir()
	var ps []*projection.Projector
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	for i := range 2 {
		p := &projection.Projector{JS: env.JS, Names: env.Names, Log: env.Log,
			Checkpoint: filepath.Join(dir, fmt.Sprintf("p%d.seq", i)), MaxInFlight: 8}
		ps = append(ps, p)
		go func() { _ = p.Run(ctx); done <- struct{}{} }()
	}
	appendLifecycles(t, env, 40, "g1")
	last := lastSeq(t, env)
	for _, p := range ps {
		env.WaitFor("projector to store everything", 30*time.Second, func() bool { return p.Applied() == last })
	}
	want, n, err := projection.Replay(context.Background(), env.JS, env.Names)
	if err != nil || n != int(last) {
		t.Fatalf("replay: %d events, %v", n, err)
	}
	got, err := projection.Load(context.Background(), env.JS, env.Names)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("bucket has %d records, replay %d", len(got), len(want))
	}
	for name, w := range want {
		g := got[name]
		if g == nil || !reflect.DeepEqual(norm(w), norm(g)) {
			t.Fatalf("record %s:\nreplay %s\nbucket %v", name, w.Marshal(), g)
		}
		for _, p := range ps {
			if c := p.Current(name); c == nil || c.LastSeq != w.LastSeq || c.State != api.StateStopped {
				t.Fatalf("projector's record of %s: %+v", name, c)
			}
		}
	}
	cancel()
	for range ps {
		<-done
	}
	for i := range ps {
		b, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("p%d.seq", i)))
		if err != nil || strings.TrimSpace(string(b)) != strconv.FormatUint(last, 10) {
			t.Fatalf("checkpoint %d = %q, %v; want %d", i, b, err, last)
		}
	}
}

// A projector that restarts from its checkpoint goes on from there.
func TestProjectorResumes(t *testing.T) {
	env := testenv.New(t)
	cp := filepath.Join(t.TempDir(), "p.seq")
	run := func(until uint64) {
		ctx, cancel := context.WithCancel(context.Background())
		p := &projection.Projector{JS: env.JS, Names: env.Names, Log: env.Log, Checkpoint: cp}
		done := make(chan struct{})
		go func() { _ = p.Run(ctx); close(done) }()
		env.WaitFor("projector to store everything", 30*time.Second, func() bool { return p.Applied() == until })
		cancel()
		<-done
	}
	appendLifecycles(t, env, 10, "g1")
	run(lastSeq(t, env))
	appendLifecycles(t, env, 10, "g2") // a second generation of the same VMs' commands
	run(lastSeq(t, env))
	want, _, err := projection.Replay(context.Background(), env.JS, env.Names)
	if err != nil {
		t.Fatal(err)
	}
	got, err := projection.Load(context.Background(), env.JS, env.Names)
	if err != nil {
		t.Fatal(err)
	}
	for name, w := range want {
		if g := got[name]; g == nil || !reflect.DeepEqual(norm(w), norm(g)) {
			t.Fatalf("record %s:\nreplay %s\nbucket %v", name, w.Marshal(), g)
		}
	}
}

func norm(r *api.VmRecord) *api.VmRecord {
	out, _ := api.UnmarshalRecord(r.Marshal())
	return out
}

// The projector's cache stays within MaxCached under a flood of names
// that never exist (rejections only) mixed with real VMs, and what it
// forgets is still right: the bucket holds every real VM's record, equal
// to a replay, and the names without a record have none.
func TestProjectorCacheBounded(t *testing.T) {
	env := testenv.New(t)
	const maxCached = 100
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	p := &projection.Projector{JS: env.JS, Names: env.Names, Log: env.Log, MaxCached: maxCached, Linger: -1}
	done := make(chan struct{})
	go func() { _ = p.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	for i := range 1000 {
		ev := &api.Event{Type: api.TypeRejected, VM: fmt.Sprintf("junk%04d", i), CommandID: "c1", Action: fsm.ActStart,
			Time: time.Now().UTC(), Reason: "vm does not exist"}
		if _, err := env.JS.PublishAsync(env.Names.Event(ev.VM, ev.Type, api.EngineWriter), ev.Encode()); err != nil {
			t.Fatal(err)
		}
	}
	appendLifecycles(t, env, 150, "g1")
	last := lastSeq(t, env)
	env.WaitFor("projector to store everything", 30*time.Second, func() bool { return p.Applied() == last })
	if n := len(p.VMs()); n > maxCached {
		t.Errorf("the projector caches %d VMs, MaxCached is %d", n, maxCached)
	}
	want, _, err := projection.Replay(context.Background(), env.JS, env.Names)
	if err != nil {
		t.Fatal(err)
	}
	got, err := projection.Load(context.Background(), env.JS, env.Names)
	if err != nil {
		t.Fatal(err)
	}
	real := 0
	for name, w := range want {
		if !w.Exists() {
			if got[name] != nil {
				t.Errorf("%s never existed and has a record: %s", name, got[name].Marshal())
			}
			continue
		}
		real++
		if g := got[name]; g == nil || !reflect.DeepEqual(norm(w), norm(g)) {
			t.Fatalf("record %s:\nreplay %s\nbucket %v", name, w.Marshal(), g)
		}
		if r, err := p.Get(context.Background(), name); err != nil || r == nil || r.LastSeq != w.LastSeq {
			t.Fatalf("Get(%s) = %+v, %v; want the record at seq %d", name, r, err, w.LastSeq)
		}
	}
	if real != 150 {
		t.Fatalf("replay has %d real VMs, want 150", real)
	}
	t.Logf("1,150 names folded; %d cached (MaxCached %d)", len(p.VMs()), maxCached)
}

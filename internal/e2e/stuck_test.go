package e2e_test

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/datadir"
	"github.com/vmherd/vmherd/internal/testenv"
)

// engineProc is an engine process (embedded server, local Noop worker h1)
// that can be restarted on its data dir, with its metrics served.
type engineProc struct {
	t       *testing.T
	bin     string
	dir     string
	port    int
	metrics string
	args    []string
	proc    *testenv.Proc
}

func startEngineProc(t *testing.T, args ...string) *engineProc {
	t.Helper()
	e := &engineProc{t: t, bin: testenv.Binaries(t), dir: filepath.Join(t.TempDir(), "data"), port: testenv.FreePort(t),
		metrics: testenv.Addr(testenv.FreePort(t)), args: args}
	e.start()
	return e
}

func (e *engineProc) url() string { return "nats://" + testenv.Addr(e.port) }

func (e *engineProc) start() {
	e.t.Helper()
	e.proc = testenv.StartProc(e.t, "engine", filepath.Join(e.bin, "engine"), nil,
		append([]string{"--data-dir", e.dir, "--listen", testenv.Addr(e.port), "--with-worker", "--backends", "noop",
			"--host", "h1", "--metrics-listen", e.metrics}, e.args...)...)
	e.proc.WaitLog("engine serving", 60*time.Second)
}

// restart stops the engine (SIGTERM, drained) and starts it again.
func (e *engineProc) restart() {
	e.t.Helper()
	if err := e.proc.Term(60 * time.Second); err != nil {
		e.t.Logf("engine stop: %v", err)
	}
	e.start()
}

// metric reads one unlabelled sample from the engine's /metrics.
func (e *engineProc) metric(name string) float64 {
	e.t.Helper()
	resp, err := http.Get("http://" + e.metrics + "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == name {
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				e.t.Fatal(err)
			}
			return v
		}
	}
	e.t.Fatalf("metric %s not served", name)
	return 0
}

// settledRSS is the engine's resident set once it has given idle heap
// back: the least of samples taken each second over a little more than
// one period of app.returnMemory (10 s), so the figures before and after
// a load are taken alike, not one just before and one just after a
// return.
func (e *engineProc) settledRSS() float64 {
	e.t.Helper()
	least := e.metric("process_resident_memory_bytes")
	for range 11 {
		time.Sleep(time.Second)
		least = min(least, e.metric("process_resident_memory_bytes"))
	}
	return least
}

// consumers counts the consumers of every vmherd stream.
func consumers(t *testing.T, env *testenv.Env) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, name := range []string{env.Names.CommandsStream(), env.Names.EventsStream(), env.Names.TasksStream()} {
		st, err := env.JS.Stream(context.Background(), name)
		if err != nil {
			t.Fatal(err)
		}
		info, err := st.Info(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		out[name] = info.State.Consumers
	}
	return out
}

// A name whose only events are rejections, or observations a worker wrote
// on its own token, is decided at once after the engine restarts (its
// bucket has no record of it, nor has the restarted projector), and
// deciding it creates no consumer or goroutine that outlives it.
func TestPoisonedNamesAfterRestart(t *testing.T) {
	eng := startEngineProc(t)
	env := testenv.AttachCreds(t, eng.url(), datadir.AdminCreds(eng.dir))
	_, wjs, _ := connectAs(t, eng.url(), eng.dir, auth.Identity{Role: auth.RoleWorker, Host: "h1"})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// rejected-only: a start of a VM that does not exist (twice, the
	// second published as a user would, with an empty body).
	env.Send("poisonr", "start", `{"command_id":"r1"}`, "r1")
	if ev := env.Decision("poisonr", "r1", 30*time.Second); ev.Type != api.TypeRejected {
		t.Fatalf("start of a missing vm: %+v", ev)
	}
	if _, err := env.JS.Publish(ctx, env.Names.Command("poisonr", "start"), nil); err != nil {
		t.Fatal(err)
	}
	env.WaitFor("the second rejection", 30*time.Second, func() bool { return env.CountType("poisonr", api.TypeRejected) == 2 })
	// observation-only: h1's worker says a VM it never had exited.
	obs := &api.Event{Type: api.TypeExited, VM: "poisono", Time: time.Now().UTC(), Host: "h1",
		Handle: &api.VmHandle{ID: "x", Name: "poisono", Backend: api.BackendNoop, Host: "h1", PID: 7}, Reason: "forged"}
	if _, err := wjs.Publish(ctx, env.Names.Event("poisono", api.TypeExited, "h1"), obs.Encode()); err != nil {
		t.Fatal(err)
	}

	eng.restart()
	env.WaitFor("h1 heartbeats again", 30*time.Second, func() bool {
		kv, err := env.JS.KeyValue(ctx, env.Names.HostsBucket())
		if err != nil {
			return false
		}
		_, err = kv.Get(ctx, "h1")
		return err == nil
	})
	// A VM decided once, so the engine's steady state is what is counted.
	env.Send("warm", "prepare", prepareBody("warm"), "w1")
	env.Result("warm", "w1", 30*time.Second)
	time.Sleep(time.Second)
	goBefore, consBefore := eng.metric("go_goroutines"), consumers(t, env)

	for _, name := range []string{"poisonr", "poisono"} {
		id := name + "-prepare"
		t0 := time.Now()
		env.Send(name, "prepare", fmt.Sprintf(`{"command_id":%q,"spec":{"backend":"noop"}}`, id), id)
		ev := env.Decision(name, id, 30*time.Second)
		took := time.Since(t0)
		if ev.Type != api.TypeAccepted {
			t.Fatalf("%s: prepare after the restart: %+v", name, ev)
		}
		if res := env.Result(name, id, 30*time.Second); res.Type != api.TypePrepared {
			t.Fatalf("%s: result %+v", name, res)
		}
		t.Logf("%s: prepare decided %v after it was sent", name, took.Round(time.Millisecond))
		if took > 3*time.Second {
			t.Errorf("%s: the prepare after the restart took %v to be decided (want at once, < 3s)", name, took)
		}
	}
	// Goroutines settle back to what they were; consumers are the same.
	var goAfter float64
	env.WaitFor("goroutines to settle", 15*time.Second, func() bool {
		goAfter = eng.metric("go_goroutines")
		return goAfter <= goBefore
	})
	consAfter := consumers(t, env)
	t.Logf("goroutines %v -> %v; consumers %v -> %v", goBefore, goAfter, consBefore, consAfter)
	for s, n := range consBefore {
		if consAfter[s] != n {
			t.Errorf("stream %s: %d consumers before, %d after", s, n, consAfter[s])
		}
	}
	if !strings.Contains(eng.proc.Output(), "folded the rest from the stream") {
		t.Errorf("the engine did not log its catch-up from the stream")
	}
}

// A flood of 20,000 commands by one operator, each for a name of its own,
// keeps another operator's commands decided within a bound measured in
// the same run, and the engine's memory comes back.
//
// Alice's command waits behind the flood's commands the server stored
// before hers, and behind their rejections: two stored messages per flood
// command, which the engine cannot reorder. The yardstick is the time this
// server takes to store as many messages as the flood has (the slower of a
// pass before and one after the flood, as the machine's load changes);
// the bound is 4x it plus 2 s. Memory (settledRSS before the flood and
// from 60 s after it): the engine (with its embedded
// server and local worker) grows by at most floodRSSPeak during the flood
// and is within floodRSSAfter of where it started 60 s after it (the
// projector caches at most DefaultMaxCached names, the limiter 4,096
// issuers, and idle heap is given back to the OS: app.returnMemory).
func TestFloodBoundedMemory(t *testing.T) {
	eng := &engineProc{t: t, bin: testenv.PlainBinaries(t), dir: filepath.Join(t.TempDir(), "data"), port: testenv.FreePort(t),
		metrics: testenv.Addr(testenv.FreePort(t))}
	eng.start()
	env := testenv.AttachCreds(t, eng.url(), datadir.AdminCreds(eng.dir))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const flood = 20000
	fnc, _, _ := connectAs(t, eng.url(), eng.dir, auth.Identity{Role: auth.RoleOperator, User: "flood"})
	fjs, err := jetstream.New(fnc, jetstream.WithPublishAsyncMaxPending(flood))
	if err != nil {
		t.Fatal(err)
	}
	_, ajs, _ := connectAs(t, eng.url(), eng.dir, auth.Identity{Role: auth.RoleOperator, User: "alice"})
	body := `{"command_id":"f00000"}`
	sjs, err := jetstream.New(env.NC, jetstream.WithPublishAsyncMaxPending(flood))
	if err != nil {
		t.Fatal(err)
	}
	storeBefore := timeToStore(ctx, t, sjs, flood, len(body))
	env.Send("warm", "prepare", prepareBody("warm"), "w1")
	env.Result("warm", "w1", 30*time.Second)
	rssBefore := eng.settledRSS()

	peak := rssBefore
	sample := func() { peak = max(peak, eng.metric("process_resident_memory_bytes")) }
	started := make(chan struct{})
	floodDone := make(chan error, 1)
	go func() {
		for i := range flood {
			if i == flood/10 {
				close(started)
			}
			name := fmt.Sprintf("f%05d", i)
			if _, err := fjs.PublishAsync(env.Names.IssuedCommand(name, "start", "flood"), fmt.Appendf(nil, `{"command_id":"f%05d"}`, i)); err != nil {
				floodDone <- err
				return
			}
		}
		select {
		case <-fjs.PublishAsyncComplete():
			floodDone <- nil
		case <-ctx.Done():
			floodDone <- ctx.Err()
		}
	}()
	<-started
	worst := aliceLifecycle(ctx, t, env, ajs, time.Minute, sample)
	if err := <-floodDone; err != nil {
		t.Fatalf("flooding: %v", err)
	}
	// Every flood command decided (the last name's rejection stored).
	env.WaitFor("the flood's last rejection", 3*time.Minute, func() bool {
		sample()
		return env.CountType(fmt.Sprintf("f%05d", flood-1), api.TypeRejected) == 1
	})
	sample()
	during := peak
	floodOver := time.Now()
	storeFlood := max(storeBefore, timeToStore(ctx, t, sjs, flood, len(body)))
	time.Sleep(time.Until(floodOver.Add(60 * time.Second)))
	rssAfter := eng.settledRSS()
	t.Logf("60 s after: heap in use %.0f MB, idle %.0f MB, released %.0f MB, goroutines %.0f", eng.metric("go_memstats_heap_inuse_bytes")/(1<<20), eng.metric("go_memstats_heap_idle_bytes")/(1<<20), eng.metric("go_memstats_heap_released_bytes")/(1<<20), eng.metric("go_goroutines"))
	bound := 4*storeFlood + 2*time.Second
	const mb = 1 << 20
	fmt.Printf("FLOOD-TEST %d commands by one issuer: other issuer's worst decision %v (bound %v: storing %d took %v); engine RSS before %.0f MB, during %.0f MB, 60 s after %.0f MB\n",
		flood, worst.Round(time.Millisecond), bound.Round(time.Millisecond), flood, storeFlood.Round(time.Millisecond), rssBefore/mb, during/mb, rssAfter/mb)
	if worst > bound {
		t.Errorf("alice's slowest decision during the flood took %v, more than %v", worst, bound)
	}
	if during-rssBefore > floodRSSPeak {
		t.Errorf("engine RSS grew by %.0f MB during the flood (bound %d MB)", (during-rssBefore)/mb, floodRSSPeak/mb)
	}
	if rssAfter-rssBefore > floodRSSAfter {
		t.Errorf("engine RSS 60 s after the flood is %.0f MB above what it was before (bound %d MB)", (rssAfter-rssBefore)/mb, floodRSSAfter/mb)
	}
}

// The flood test's memory bounds (see docs/architecture.md). After the
// flood, what stays is live heap that does not grow with later floods
// (the server's index of the flood's subjects, its buffer pools, the
// projector's bounded cache): measured +23 to +49 MB alone, +65 MB (heap
// in use 81 MB) in a clean-clone CI run sharing two cores with the QEMU
// fault tests, when collection and the memory return lag. A leak per
// command would be 20,000 times something; the bound is twice what runs
// here show alone.
const (
	floodRSSPeak  = 200 << 20
	floodRSSAfter = 96 << 20
)

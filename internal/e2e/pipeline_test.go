package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/testenv"
)

const wait = 20 * time.Second

func setup(t *testing.T) (*testenv.Env, *testenv.Part, *noop.Backend) {
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	nb := noop.New(noop.Options{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb})
	env.WaitHost(eng, "h1")
	t.Cleanup(func() {
		if !t.Failed() {
			c := env.CheckStreams()
			t.Logf("streams: %s", c)
		}
	})
	return env, eng, nb
}

func prepareBody(name string) string {
	return fmt.Sprintf(`{"spec":{"name":%q,"backend":"noop","vcpus":1,"memory_mb":128}}`, name)
}

// One VM through its whole life over NATS, every event checked, then the
// name used again.
func TestLifecycle(t *testing.T) {
	env, _, _ := setup(t)
	steps := []struct {
		action, result string
		state          api.VmState
		transitional   api.VmState
	}{
		{"prepare", "prepared", api.StatePrepared, api.StatePreparing},
		{"start", "started", api.StateRunning, api.StateStarting},
		{"suspend", "suspended", api.StateSuspended, api.StateSuspending},
		{"resume", "resumed", api.StateRunning, api.StateResuming},
		{"stop", "stopped", api.StateStopped, api.StateStopping},
		{"start", "started", api.StateRunning, api.StateStarting},
		{"stop", "stopped", api.StateStopped, api.StateStopping},
		{"destroy", "destroyed", api.StateDestroyed, api.StateDestroying},
	}
	for round := 0; round < 2; round++ {
		base := len(env.Events("web1"))
		for i, s := range steps {
			id := fmt.Sprintf("r%d-c%d-%s", round, i, s.action)
			body := ""
			if s.action == "prepare" {
				body = prepareBody("web1")
			}
			env.Send("web1", s.action, strings.Replace(body, `{"spec"`, `{"command_id":"`+id+`","spec"`, 1), id)
			res := env.Result("web1", id, wait)
			if string(res.Type) != s.result {
				t.Fatalf("round %d step %d %s: result %s (%s%s), want %s", round, i, s.action, res.Type, res.Reason, res.Error, s.result)
			}
		}
		evs := env.Events("web1")[base:]
		if len(evs) != 2*len(steps) {
			t.Fatalf("round %d: %d events, want %d", round, len(evs), 2*len(steps))
		}
		var lastSeq uint64
		for i, s := range steps {
			acc, res := evs[2*i].Event, evs[2*i+1].Event
			id := fmt.Sprintf("r%d-c%d-%s", round, i, s.action)
			if acc.Type != api.TypeAccepted || acc.CommandID != id || string(acc.Action) != s.action || acc.State != s.transitional || acc.Host != "h1" {
				t.Errorf("round %d step %d: got %+v, want accepted %s (%s) for %s", round, i, acc, s.action, s.transitional, id)
			}
			if string(res.Type) != s.result || res.CommandID != id || res.State != s.state || res.Host != "h1" {
				t.Errorf("round %d step %d: got %+v, want %s (%s) for %s", round, i, res, s.result, s.state, id)
			}
			if res.AcceptedSeq != evs[2*i].Seq {
				t.Errorf("round %d step %d: result answers seq %d, accepted was %d", round, i, res.AcceptedSeq, evs[2*i].Seq)
			}
			if evs[2*i].Seq <= lastSeq || evs[2*i+1].Seq <= evs[2*i].Seq {
				t.Errorf("round %d step %d: events out of order", round, i)
			}
			lastSeq = evs[2*i+1].Seq
		}
		env.WaitFor("record destroyed", wait, func() bool {
			r := record(t, env, "web1")
			return r != nil && r.State == api.StateDestroyed && r.Generation == round+1
		})
		r := record(t, env, "web1")
		if len(r.InFlight) != 0 || r.Host != "h1" || r.Backend != api.BackendNoop || r.LastEvent != api.TypeDestroyed {
			t.Fatalf("final record %+v", r)
		}
	}
	env.CheckProjection(wait)
}

func record(t *testing.T, env *testenv.Env, name string) *api.VmRecord {
	t.Helper()
	recs, err := projection.Load(context.Background(), env.JS, env.Names)
	if err != nil {
		t.Fatal(err)
	}
	return recs[name]
}

// Every command the table forbids is rejected once, with a reason naming
// the current state and the allowed ones; bad input likewise.
func TestRejections(t *testing.T) {
	env, _, nb := setup(t)
	env.SendCmd("r1", "prepare", "p1", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("r1", "p1", wait)
	env.SendCmd("r2", "prepare", "p2", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("r2", "p2", wait)
	env.SendCmd("r2", "start", "s2", api.Command{})
	env.Result("r2", "s2", wait)

	cases := []struct {
		vm, action, body string
		want             []string
	}{
		{"r1", "suspend", "", []string{"prepared", "running"}},
		{"r1", "stop", "", []string{"prepared", "running", "suspended"}},
		{"r2", "start", "", []string{"running", "prepared", "stopped", "failed"}},
		{"r2", "resume", "", []string{"running", "suspended"}},
		{"r2", "prepare", prepareBody("r2"), []string{"running", "absent", "destroyed"}},
		{"ghost", "start", "", []string{"does not exist", "prepared", "stopped", "failed"}},
		{"ghost", "destroy", "", []string{"does not exist"}},
		{"r1", "start", "{not json", []string{"JSON"}},
		{"r1", "start", `{"timeout_s":"soon"}`, []string{"timeout_s"}},
		{"r1", "start", `{"bogus":1}`, []string{"bogus"}},
		{"r1", "reboot", "", []string{"action", "reboot"}},
		{"r3", "prepare", `{}`, []string{"spec"}},
		{"r3", "prepare", `{"spec":{"vcpus":0,"backend":"noop"}}`, []string{"vcpus"}},
		{"r3", "prepare", `{"spec":{"memory_mb":1,"backend":"noop"}}`, []string{"memory_mb"}},
		{"r3", "prepare", `{"spec":{"name":"other","backend":"noop"}}`, []string{"name"}},
		{"r3", "prepare", `{"spec":{"backend":"noop"},"host":"nohost"}`, []string{"host", "nohost"}},
		{"r3", "prepare", `{"spec":{"backend":"qemu","image_path":"/x"}}`, []string{"qemu"}},
		{"r1", "start", `{"host":"h1"}`, []string{"host"}},
	}
	for i, c := range cases {
		id := fmt.Sprintf("bad-%d", i)
		env.Send(c.vm, c.action, c.body, id)
		ev := env.Decision(c.vm, id, wait)
		if ev.Type != api.TypeRejected {
			t.Errorf("case %d (%s %s %s): %s, want rejected", i, c.vm, c.action, c.body, ev.Type)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(ev.Reason, w) {
				t.Errorf("case %d (%s %s %s): reason %q does not mention %q", i, c.vm, c.action, c.body, ev.Reason, w)
			}
		}
	}
	// While a command is in flight only destroy is accepted.
	nb.SetLatency(noop.CallStop, 500*time.Millisecond)
	env.SendCmd("r2", "stop", "slowstop", api.Command{})
	env.Decision("r2", "slowstop", wait)
	env.SendCmd("r2", "suspend", "during", api.Command{})
	if ev := env.Decision("r2", "during", wait); ev.Type != api.TypeRejected || !strings.Contains(ev.Reason, "stopping") || !strings.Contains(ev.Reason, "only destroy") {
		t.Errorf("suspend while stopping: %+v", ev)
	}
	env.SendCmd("r2", "destroy", "wins", api.Command{})
	if ev := env.Result("r2", "wins", wait); ev.Type != api.TypeDestroyed {
		t.Errorf("destroy during stop: %+v", ev)
	}
	if ev := env.Result("r2", "slowstop", wait); ev.Type != api.TypeStopped && ev.Type != api.TypeFailed {
		t.Errorf("slow stop: %+v", ev)
	}
	env.WaitFor("r2 destroyed", wait, func() bool { r := record(t, env, "r2"); return r != nil && r.State == api.StateDestroyed })

	// Bad VM names in the subject are rejected on the _invalid subject.
	for i, name := range []string{"Web1", "a_", "x" + strings.Repeat("y", 70), "wéb"} {
		id := fmt.Sprintf("badname-%d", i)
		env.Send(name, "start", "", id)
		ev := env.Decision("_invalid", id, wait)
		if ev.Type != api.TypeRejected || ev.VM != name || !strings.Contains(ev.Reason, "name") {
			t.Errorf("name %q: %+v", name, ev)
		}
	}
	// The engine still serves.
	env.SendCmd("r1", "start", "after", api.Command{})
	if ev := env.Result("r1", "after", wait); ev.Type != api.TypeStarted {
		t.Fatalf("engine stopped serving: %+v", ev)
	}
	env.CheckProjection(wait)
}

// The same Nats-Msg-Id twice has one effect and one result.
func TestDuplicatePublish(t *testing.T) {
	env, _, nb := setup(t)
	env.SendCmd("d1", "prepare", "p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("d1", "p", wait)
	for i := 0; i < 3; i++ {
		env.Send("d1", "start", `{"command_id":"once"}`, "once")
	}
	env.Result("d1", "once", wait)
	env.SendCmd("d1", "stop", "barrier", api.Command{})
	env.Result("d1", "barrier", wait)
	n := 0
	for _, s := range env.Events("d1") {
		if s.Event.CommandID == "once" {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("command 'once' has %d events, want 2 (accepted, started)", n)
	}
	if got := nb.Effects(noop.CallStart); got != 1 {
		t.Fatalf("start ran %d times on the backend, want 1", got)
	}
}

// A worker killed during a slow call: the task is redelivered to its
// successor, which produces exactly one result.
func TestWorkerKilledMidCall(t *testing.T) {
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	nb := noop.New(noop.Options{})
	w1 := env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb, AckWait: time.Second})
	env.WaitHost(eng, "h1")
	env.SendCmd("k1", "prepare", "p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("k1", "p", wait)
	nb.SetLatency(noop.CallStart, 3*time.Second)
	env.SendCmd("k1", "start", "slow", api.Command{})
	env.Decision("k1", "slow", wait)
	env.WaitFor("the slow start to reach the backend", wait, func() bool { return nb.Calls(noop.CallStart) == 1 })
	w1.Kill()
	nb.SetLatency(noop.CallStart, 100*time.Millisecond)
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb, AckWait: time.Second})
	if ev := env.Result("k1", "slow", wait); ev.Type != api.TypeStarted {
		t.Fatalf("result %+v", ev)
	}
	env.SendCmd("k1", "stop", "barrier", api.Command{})
	env.Result("k1", "barrier", wait)
	results := 0
	for _, s := range env.Events("k1") {
		if s.Event.CommandID == "slow" && s.Event.Type.IsResult() {
			results++
		}
	}
	if results != 1 {
		t.Fatalf("%d results for the slow start, want 1", results)
	}
	if got := nb.Effects(noop.CallStart); got != 1 {
		t.Fatalf("start took effect %d times, want 1", got)
	}
	c := env.CheckStreams()
	if c.Lost != 0 || c.Duplicates != 0 {
		t.Fatalf("streams: %s", c)
	}
}

// A call longer than the ack wait is not redone: progress keeps it.
func TestSlowCallLongerThanAckWait(t *testing.T) {
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	nb := noop.New(noop.Options{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb, AckWait: 600 * time.Millisecond})
	env.WaitHost(eng, "h1")
	env.SendCmd("s1", "prepare", "p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("s1", "p", wait)
	env.SendCmd("s1", "start", "st", api.Command{})
	env.Result("s1", "st", wait)
	nb.SetLatency(noop.CallStop, 2500*time.Millisecond)
	env.SendCmd("s1", "stop", "longstop", api.Command{})
	if ev := env.Result("s1", "longstop", wait); ev.Type != api.TypeStopped {
		t.Fatalf("result %+v", ev)
	}
	if got := nb.Effects(noop.CallStop); got != 1 {
		t.Fatalf("stop took effect %d times", got)
	}
	c := env.CheckStreams()
	if c.Duplicates != 0 || c.Lost != 0 {
		t.Fatalf("streams: %s", c)
	}
}

// Two engines consume the same command stream: no VM's events break the FSM.
func TestTwoEnginesRace(t *testing.T) {
	env := testenv.New(t)
	e1 := env.StartEngine(testenv.EngineConfig{ID: "e1"})
	env.StartEngine(testenv.EngineConfig{ID: "e2"})
	env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(e1, "h1")
	const vms = 30
	actions := []string{"start", "suspend", "resume", "stop", "start", "stop", "destroy", "prepare", "start"}
	var wg sync.WaitGroup
	for i := 0; i < vms; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := fmt.Sprintf("race%d", i)
			env.Send(name, "prepare", prepareBody(name), name+"-p")
			// Fire commands without waiting: many are rejected, none may
			// break the FSM.
			for j := 0; j < 12; j++ {
				a := actions[rand.IntN(len(actions))]
				body := ""
				if a == "prepare" {
					body = prepareBody(name)
				}
				env.Send(name, a, body, fmt.Sprintf("%s-%d", name, j))
			}
		}()
	}
	wg.Wait()
	env.WaitFor("all commands decided and answered", 60*time.Second, func() bool {
		recs, _, err := projection.Replay(context.Background(), env.JS, env.Names)
		if err != nil {
			return false
		}
		decided := 0
		for _, s := range env.AllEvents() {
			if s.Event.Type == api.TypeAccepted || s.Event.Type == api.TypeRejected {
				decided++
			}
		}
		for _, r := range recs {
			if len(r.InFlight) > 0 {
				return false
			}
		}
		return decided == vms*13
	})
	c := env.CheckStreams()
	t.Logf("streams: %s", c)
	if c.Accepted == 0 || c.Rejected == 0 || c.Duplicates != 0 || c.Lost != 0 {
		t.Fatalf("unexpected counts: %s", c)
	}
	env.CheckProjection(wait)
}

// Dropping VM_RECORDS and rebuilding gives the same records.
func TestRebuildEqualsLive(t *testing.T) {
	env, _, _ := setup(t)
	for i := 0; i < 10; i++ {
		name := fmt.Sprintf("rb%d", i)
		env.SendCmd(name, "prepare", name+"p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
		env.SendCmd(name, "start", name+"s", api.Command{})
		if i%2 == 0 {
			env.SendCmd(name, "suspend", name+"u", api.Command{})
		}
		if i%3 == 0 {
			env.SendCmd(name, "destroy", name+"d", api.Command{})
		}
	}
	env.WaitFor("all settled", wait, func() bool {
		recs, _, _ := projection.Replay(context.Background(), env.JS, env.Names)
		if len(recs) != 10 {
			return false
		}
		for _, r := range recs {
			if fsm.Transitional(r.State) {
				return false
			}
		}
		return true
	})
	env.CheckProjection(wait)
	live, err := projection.Load(context.Background(), env.JS, env.Names)
	if err != nil {
		t.Fatal(err)
	}
	n, count, err := projection.Rebuild(context.Background(), env.JS, env.Names, jsetup.DefaultSettings)
	if err != nil {
		t.Fatal(err)
	}
	if n != 10 || count == 0 {
		t.Fatalf("rebuild wrote %d records from %d events", n, count)
	}
	rebuilt, err := projection.Load(context.Background(), env.JS, env.Names)
	if err != nil {
		t.Fatal(err)
	}
	if len(rebuilt) != len(live) {
		t.Fatalf("rebuilt %d records, live had %d", len(rebuilt), len(live))
	}
	for k, r := range live {
		if string(r.Marshal()) != string(rebuilt[k].Marshal()) {
			t.Fatalf("record %s differs:\nlive    %s\nrebuilt %s", k, r.Marshal(), rebuilt[k].Marshal())
		}
	}
	// The engine keeps projecting after a rebuild.
	env.SendCmd("rb1", "stop", "after", api.Command{})
	env.Result("rb1", "after", wait)
	env.CheckProjection(wait)
}

// A graceful worker stop (SIGTERM in the binary) lets the call in progress
// finish and record its result before the worker exits.
func TestWorkerDrainsOnStop(t *testing.T) {
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	nb := noop.New(noop.Options{})
	w := env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb})
	env.WaitHost(eng, "h1")
	env.SendCmd("dr", "prepare", "p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("dr", "p", wait)
	nb.SetLatency(noop.CallStart, time.Second)
	env.SendCmd("dr", "start", "slow", api.Command{})
	env.WaitFor("the start call to reach the backend", wait, func() bool { return nb.Calls(noop.CallStart) == 1 })
	if err := w.Stop(); err != nil {
		t.Fatal(err)
	}
	// The result was stored before Stop returned: no worker runs now.
	found := false
	for _, s := range env.Events("dr") {
		if s.Event.CommandID == "slow" && s.Event.Type == api.TypeStarted {
			found = true
		}
	}
	if !found {
		t.Fatal("the worker stopped without recording the result of the call in progress")
	}
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// Destroying a VM whose prepare failed is allowed and its destroyed event,
// which names no incarnation, still matches the schema.
func TestDestroyAfterFailedPrepare(t *testing.T) {
	env, _, nb := setup(t)
	nb.FailNext(noop.CallPrepare, 1)
	env.SendCmd("fp", "prepare", "p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	if ev := env.Result("fp", "p", wait); ev.Type != api.TypeFailed || !strings.Contains(ev.Error, "injected") {
		t.Fatalf("prepare: %+v", ev)
	}
	env.SendCmd("fp", "destroy", "d", api.Command{})
	if ev := env.Result("fp", "d", wait); ev.Type != api.TypeDestroyed {
		t.Fatalf("destroy: %+v", ev)
	}
	env.AllEvents() // fails the test on any event outside its schema
}

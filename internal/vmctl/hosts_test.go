package vmctl

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/testenv"
)

// hostEvents returns the host events stored for host, oldest first.
func hostEvents(t *testing.T, env *testenv.Env, host string) []*api.HostEvent {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	st, err := env.JS.Stream(ctx, env.Names.EventsStream())
	if err != nil {
		t.Fatal(err)
	}
	var out []*api.HostEvent
	for _, ty := range api.HostEventTypes {
		subj := env.Names.HostEvent(host, ty)
		m, err := st.GetLastMsgForSubject(ctx, subj)
		if err != nil {
			continue
		}
		ev, err := api.DecodeHostEvent(m.Data)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, ev)
	}
	return out
}

const wait = 20 * time.Second

// recordOf reads a VM's record from the bucket.
func recordOf(t *testing.T, env *testenv.Env, name string) *api.VmRecord {
	t.Helper()
	kv, err := env.JS.KeyValue(t.Context(), env.Names.RecordsBucket())
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(t.Context(), name)
	if err != nil {
		t.Fatalf("record of %s: %v", name, err)
	}
	r, err := api.UnmarshalRecord(e.Value())
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func hasHostEvent(t *testing.T, env *testenv.Env, host string, ty api.HostEventType) *api.HostEvent {
	for _, ev := range hostEvents(t, env, host) {
		if ev.Type == ty {
			return ev
		}
	}
	return nil
}

// Hosts as first-class objects: `vmctl hosts` shows them; a cordoned host
// takes no placement; a lost host's VMs read unknown, are forgotten with
// destroy --forget, and when the host comes back its worker fences them;
// a lost host without VMs is forgotten. Every change is a host event.
func TestHostsCordonLostForgetFence(t *testing.T) {
	ctx := t.Context()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{HostLostAfter: 2 * time.Second})
	nb1 := noop.New(noop.Options{})
	w1 := env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb1})
	env.StartWorker(testenv.WorkerConfig{Host: "h2"})
	env.WaitHost(eng, "h1")
	env.WaitHost(eng, "h2")
	url := env.URL

	r := vmctl(t, ctx, url, "hosts")
	if r.code != 0 || !strings.Contains(r.out, "h1") || !strings.Contains(r.out, "alive") || !strings.Contains(r.out, "noop*") {
		t.Fatalf("hosts:\n%s", r)
	}

	// Cordon h2: a pin to it is rejected, placement goes to h1.
	if r := vmctl(t, ctx, url, "host", "cordon", "h2", "--reason", "kernel update"); r.code != 0 {
		t.Fatalf("cordon:\n%s", r)
	}
	env.WaitFor("host_cordoned event", wait, func() bool { return hasHostEvent(t, env, "h2", api.HostCordoned) != nil })
	if ev := hasHostEvent(t, env, "h2", api.HostCordoned); ev.Reason != "kernel update" {
		t.Fatalf("host_cordoned: %+v", ev)
	}
	r = vmctl(t, ctx, url, "create", "pinned", "--backend", "noop", "--host", "h2")
	if r.code != ExitFailed || !strings.Contains(r.err, "cordoned") {
		t.Fatalf("create pinned to a cordoned host:\n%s", r)
	}
	for _, n := range []string{"a", "b"} {
		if r := vmctl(t, ctx, url, "create", n, "--backend", "noop", "--start"); r.code != 0 {
			t.Fatalf("create %s:\n%s", n, r)
		}
		env.WaitFor(n+" running in the records", wait, func() bool { return recordOf(t, env, n).State == api.StateRunning })
		if rec := recordOf(t, env, n); rec.Host != "h1" {
			t.Fatalf("%s placed on %s while h2 is cordoned", n, rec.Host)
		}
	}
	r = vmctl(t, ctx, url, "hosts", "--json")
	var rows []hostRow
	if err := json.Unmarshal([]byte(r.out), &rows); err != nil || len(rows) != 2 {
		t.Fatalf("hosts --json: %v\n%s", err, r)
	}
	if rows[0].Host.Host != "h1" || rows[0].VMs != 2 || rows[1].Status != "alive,cordoned" || rows[1].Cordon == nil {
		t.Fatalf("hosts --json rows: %+v %+v", rows[0], rows[1])
	}
	if r := vmctl(t, ctx, url, "host", "uncordon", "h2"); r.code != 0 {
		t.Fatalf("uncordon:\n%s", r)
	}
	env.WaitFor("host_uncordoned event", wait, func() bool { return hasHostEvent(t, env, "h2", api.HostUncordoned) != nil })

	// h1's worker goes away: h1 is lost, its VMs read unknown.
	if err := w1.Stop(); err != nil {
		t.Fatal(err)
	}
	env.WaitFor("host_lost event", wait, func() bool { return hasHostEvent(t, env, "h1", api.HostLost) != nil })
	if ev := hasHostEvent(t, env, "h1", api.HostLost); strings.Join(ev.VMs, ",") != "a,b" {
		t.Fatalf("host_lost lists %v, want a,b", ev.VMs)
	}
	r = vmctl(t, ctx, url, "list")
	if !strings.Contains(r.out, "unknown (host lost; last running)") {
		t.Fatalf("list with a lost host:\n%s", r)
	}
	r = vmctl(t, ctx, url, "destroy", "a")
	if r.code != ExitFailed || !strings.Contains(r.err, "destroy --forget a") {
		t.Fatalf("destroy on a lost host:\n%s", r)
	}
	r = vmctl(t, ctx, url, "host", "forget", "h1")
	if r.code != ExitFailed || !strings.Contains(r.err, "a, b") {
		t.Fatalf("forget a host with VMs:\n%s", r)
	}
	if r := vmctl(t, ctx, url, "destroy", "--forget", "a"); r.code != 0 {
		t.Fatalf("destroy --forget:\n%s", r)
	}
	env.WaitFor("a destroyed in the records", wait, func() bool { return recordOf(t, env, "a").State == api.StateDestroyed })
	if rec := recordOf(t, env, "a"); !strings.Contains(rec.LastError, "forgotten") {
		t.Fatalf("forgotten record: %+v", rec)
	}
	// The name is free again: prepared on h2.
	if r := vmctl(t, ctx, url, "create", "a", "--backend", "noop", "--start"); r.code != 0 {
		t.Fatalf("create a again:\n%s", r)
	}
	env.WaitFor("a running on h2 in the records", wait, func() bool {
		rec := recordOf(t, env, "a")
		return rec.Host == "h2" && rec.State == api.StateRunning
	})

	// h1 comes back (same backend state: its VMs still run there). Its
	// worker fences a, keeps b.
	if got := nb1.Effects("destroy"); got != 0 {
		t.Fatalf("destroy effects on h1 before it is back: %d", got)
	}
	w1 = env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb1})
	env.WaitHost(eng, "h1")
	env.WaitFor("host_back event", wait, func() bool { return hasHostEvent(t, env, "h1", api.HostBack) != nil })
	env.WaitFor("a fenced on h1", wait, func() bool { return env.CountType("a", api.TypeFenced) == 1 })
	if got := nb1.Effects("destroy"); got != 1 {
		t.Fatalf("h1 destroyed %d VMs on return, want 1 (a)", got)
	}
	if rec := recordOf(t, env, "a"); rec.Host != "h2" || rec.State != api.StateRunning {
		t.Fatalf("the fence touched the new a: %+v", rec)
	}
	if rec := recordOf(t, env, "b"); rec.State != api.StateRunning {
		t.Fatalf("b after h1 came back: %+v", rec)
	}

	// Retire h1 for good: forget b, then the host.
	if err := w1.Stop(); err != nil {
		t.Fatal(err)
	}
	env.WaitFor("h1 lost again", wait, func() bool {
		var rows []hostRow
		_ = json.Unmarshal([]byte(vmctl(t, ctx, url, "hosts", "--json").out), &rows)
		return len(rows) > 0 && rows[0].Host.Host == "h1" && rows[0].Status == "lost"
	})
	if r := vmctl(t, ctx, url, "destroy", "--forget", "b"); r.code != 0 {
		t.Fatalf("forget b:\n%s", r)
	}
	if r := vmctl(t, ctx, url, "host", "forget", "h1"); r.code != 0 {
		t.Fatalf("host forget:\n%s", r)
	}
	env.WaitFor("host_forgotten event", wait, func() bool { return hasHostEvent(t, env, "h1", api.HostForgotten) != nil })
	if r := vmctl(t, ctx, url, "hosts"); strings.Contains(r.out, "h1") {
		t.Fatalf("hosts after forgetting h1:\n%s", r)
	}
	r = vmctl(t, ctx, url, "events")
	for _, want := range []string{"host=h1 host_lost", "host=h1 host_back", "host=h2 host_cordoned", "host=h1 host_forgotten", "fenced"} {
		if !strings.Contains(r.out, want) {
			t.Fatalf("events lack %q:\n%s", want, r)
		}
	}
	env.CheckProjection(wait)
}

// drain --stop cordons the host, stops its running and suspended VMs,
// leaves the others, and says what is left on it.
func TestHostDrain(t *testing.T) {
	ctx := t.Context()
	env, _ := pipeline(t, noop.New(noop.Options{}))
	url := env.URL
	for _, c := range [][]string{
		{"create", "run1", "--backend", "noop", "--start"},
		{"create", "sus1", "--backend", "noop", "--start"},
		{"suspend", "sus1"},
		{"create", "prep1", "--backend", "noop"},
	} {
		if r := vmctl(t, ctx, url, c...); r.code != 0 {
			t.Fatalf("%v:\n%s", c, r)
		}
	}
	r := vmctl(t, ctx, url, "host", "drain", "h1", "--stop", "--stop-timeout", "5s")
	if r.code != 0 || !strings.Contains(r.out, "cordoned") || !strings.Contains(r.out, "left on h1") ||
		!strings.Contains(r.out, "prep1, run1, sus1") {
		t.Fatalf("drain:\n%s", r)
	}
	for n, want := range map[string]api.VmState{"run1": api.StateStopped, "sus1": api.StateStopped, "prep1": api.StatePrepared} {
		env.WaitFor(n+" "+string(want)+" after drain", wait, func() bool { return recordOf(t, env, n).State == want })
	}
	r = vmctl(t, ctx, url, "create", "new1", "--backend", "noop")
	if r.code != ExitFailed || !strings.Contains(r.err, "h1: cordoned") {
		t.Fatalf("create on a drained host:\n%s", r)
	}
	if r := vmctl(t, ctx, url, "host", "forget", "h1"); r.code != ExitFailed || !strings.Contains(r.err, "is alive") {
		t.Fatalf("forget an alive host:\n%s", r)
	}
	if r := vmctl(t, ctx, url, "host", "cordon", "nope"); r.code != ExitFailed || !strings.Contains(r.err, "no host named nope (known hosts: h1)") {
		t.Fatalf("cordon an unknown host:\n%s", r)
	}
	if r := vmctl(t, ctx, url, "__complete", "host", "uncordon", "h"); !strings.HasPrefix(r.out, "h1\n") {
		t.Fatalf("completion of host names:\n%s", r)
	}
}

// drain (without --stop) empties the host: its running, suspended and
// prepared VMs move to the other host (live, live, cold) and keep their
// states; one that cannot move (failed) stays, listed with the reason,
// and the exit code says so.
func TestHostDrainMoves(t *testing.T) {
	ctx := t.Context()
	nb := noop.New(noop.Options{})
	env, eng := pipeline(t, nb)
	env.StartWorker(testenv.WorkerConfig{Host: "h2", Noop: noop.New(noop.Options{})})
	env.WaitHost(eng, "h2")
	url := env.URL
	for _, c := range [][]string{
		{"create", "run1", "--backend", "noop", "--host", "h1", "--start"},
		{"create", "sus1", "--backend", "noop", "--host", "h1", "--start"},
		{"suspend", "sus1"},
		{"create", "prep1", "--backend", "noop", "--host", "h1"},
	} {
		if r := vmctl(t, ctx, url, c...); r.code != 0 {
			t.Fatalf("%v:\n%s", c, r)
		}
	}
	nb.FailNext(noop.CallStart, 1)
	if r := vmctl(t, ctx, url, "create", "bad1", "--backend", "noop", "--host", "h1", "--start"); r.code != ExitFailed {
		t.Fatalf("a start made to fail:\n%s", r)
	}
	r := vmctl(t, ctx, url, "host", "drain", "h1", "--parallel", "2")
	if r.code != ExitFailed || !strings.Contains(r.out, "3 of 4 VMs moved") || !strings.Contains(r.out, "bad1 (failed): cannot migrate: vm is failed") ||
		!strings.Contains(r.err, "3 of 4 moved") || !strings.Contains(r.err, "1 VMs could not move off h1") {
		t.Fatalf("drain:\n%s", r)
	}
	for n, want := range map[string]api.VmState{"run1": api.StateRunning, "sus1": api.StateSuspended, "prep1": api.StatePrepared} {
		env.WaitFor(n+" "+string(want)+" on h2 after drain", wait, func() bool {
			rec := recordOf(t, env, n)
			return rec.State == want && rec.Host == "h2"
		})
	}
	if r := vmctl(t, ctx, url, "hosts"); !strings.Contains(r.out, "cordoned") {
		t.Fatalf("hosts after drain:\n%s", r)
	}
	// Back: h2 drained onto h1 (uncordoned) but h1 is the only other host.
	if r := vmctl(t, ctx, url, "host", "uncordon", "h1"); r.code != 0 {
		t.Fatalf("uncordon:\n%s", r)
	}
	if r := vmctl(t, ctx, url, "migrate", "run1", "--to", "h2"); r.code != ExitFailed || !strings.Contains(r.err, "already on host h2") {
		t.Fatalf("migrate to its own host:\n%s", r)
	}
	if r := vmctl(t, ctx, url, "migrate", "run1", "--to", "h1"); r.code != 0 || !strings.Contains(r.out, "migrated") {
		t.Fatalf("migrate back:\n%s", r)
	}
	env.CheckProjection(wait)
}

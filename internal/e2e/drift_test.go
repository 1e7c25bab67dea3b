package e2e_test

import (
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/testenv"
)

// A VM whose process dies without a command yields one exited event and
// the record reads stopped; it can be started again.
func TestDriftExit(t *testing.T) {
	env, _, nb := setup(t)
	env.SendCmd("c1", "prepare", "p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("c1", "p", wait)
	env.SendCmd("c1", "start", "s", api.Command{})
	env.Result("c1", "s", wait)
	if !nb.Crash("c1", "killed by test") {
		t.Fatal("crash failed")
	}
	env.WaitFor("record stopped after the crash", wait, func() bool {
		r := record(t, env, "c1")
		return r != nil && r.State == api.StateStopped && strings.Contains(r.LastError, "killed by test")
	})
	env.SendCmd("c1", "start", "s2", api.Command{})
	if ev := env.Result("c1", "s2", wait); ev.Type != api.TypeStarted {
		t.Fatalf("restart after crash: %+v", ev)
	}
	if n := env.CountType("c1", api.TypeExited); n != 1 {
		t.Fatalf("%d exited events, want 1", n)
	}
}

// A late exited observation of a destroyed incarnation never touches the
// VM re-created under the same name, even with the same PID.
func TestStaleExitIgnored(t *testing.T) {
	env, _, _ := setup(t)
	env.SendCmd("re", "prepare", "p1", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("re", "p1", wait)
	env.SendCmd("re", "start", "s1", api.Command{})
	old := env.Result("re", "s1", wait).Handle
	env.SendCmd("re", "destroy", "d1", api.Command{})
	env.Result("re", "d1", wait)
	env.SendCmd("re", "prepare", "p2", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("re", "p2", wait)
	env.SendCmd("re", "start", "s2", api.Command{})
	cur := env.Result("re", "s2", wait).Handle
	if cur.ID == old.ID {
		t.Fatal("re-created VM kept its handle id")
	}
	// The observation arrives late, naming the old incarnation (and, to make
	// it harder, the new PID).
	stale := *old
	stale.PID = cur.PID
	ev := &api.Event{Type: api.TypeExited, VM: "re", Time: time.Now().UTC(), Host: "h1",
		State: api.StateStopped, Handle: &stale, Reason: "late observation"}
	if _, _, err := env.Store.Append(t.Context(), ev, events.NoExpect, "late-exit"); err != nil {
		t.Fatal(err)
	}
	env.SendCmd("re", "suspend", "u", api.Command{})
	if ev := env.Result("re", "u", wait); ev.Type != api.TypeSuspended {
		t.Fatalf("suspend after the stale exit: %+v (the stale exit moved the VM?)", ev)
	}
	r := record(t, env, "re")
	if r.Handle.ID != cur.ID || r.Handle.PID != cur.PID {
		t.Fatalf("record handle %+v, want the new incarnation %s/%d", r.Handle, cur.ID, cur.PID)
	}
	env.CheckProjection(wait)
}

// A host whose worker stops heartbeating is lost: commands for its VMs are
// rejected naming it. When the worker comes back it reconciles its VMs'
// records with what really runs.
func TestHostLostAndBack(t *testing.T) {
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{HostLostAfter: time.Second})
	nb := noop.New(noop.Options{})
	w := env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb})
	env.WaitHost(eng, "h1")
	for _, n := range []string{"v1", "v2"} {
		env.SendCmd(n, "prepare", n+"p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
		env.Result(n, n+"p", wait)
		env.SendCmd(n, "start", n+"s", api.Command{})
		env.Result(n, n+"s", wait)
	}
	if err := w.Stop(); err != nil {
		t.Fatal(err)
	}
	env.WaitFor("h1 lost", wait, func() bool { return !eng.Engine.Hosts().Alive("h1") })
	env.SendCmd("v1", "stop", "while-lost", api.Command{})
	ev := env.Decision("v1", "while-lost", wait)
	if ev.Type != api.TypeRejected || !strings.Contains(ev.Reason, "h1") || !strings.Contains(ev.Reason, "lost") {
		t.Fatalf("stop while the host is lost: %+v", ev)
	}
	// Placement skips the lost host.
	env.SendCmd("v3", "prepare", "v3p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	if ev := env.Decision("v3", "v3p", wait); ev.Type != api.TypeRejected || !strings.Contains(ev.Reason, "h1: lost") {
		t.Fatalf("prepare with no alive host: %+v", ev)
	}
	// v2 dies while its worker is away.
	nb.Crash("v2", "died while the worker was away")
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb})
	env.WaitHost(eng, "h1")
	env.WaitFor("v2 reconciled to stopped", wait, func() bool {
		r := record(t, env, "v2")
		return r != nil && r.State == api.StateStopped
	})
	if n := env.CountType("v2", api.TypeExited); n != 1 {
		t.Fatalf("%d exited events for v2, want 1", n)
	}
	if r := record(t, env, "v1"); r.State != api.StateRunning {
		t.Fatalf("v1 reads %s after the worker came back, want running", r.State)
	}
	env.SendCmd("v1", "stop", "back", api.Command{})
	if ev := env.Result("v1", "back", wait); ev.Type != api.TypeStopped {
		t.Fatalf("stop after the worker came back: %+v", ev)
	}
}

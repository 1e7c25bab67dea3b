package engine_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/testenv"
)

// A command decided before its VM's purge and delivered again after it
// (its ack lost) is never applied to the VM that has the name now: within
// the duplicate window its decision's message id is a duplicate whose
// message the purge removed, and it is acked as decided; after the window
// the purge's time refuses it with the reason. Found by review: the first
// was nak'd every second until the window passed, then the old destroy
// was accepted against the new VM.
func TestCommandsSentBeforeAPurge(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	// Retention of 1 s purges destroyed VMs; the engine treats commands
	// older than 1 s (half its 2 s window) as possibly decided before.
	eng := env.StartEngine(testenv.EngineConfig{RetainDestroyed: time.Second, DuplicateWindow: 2 * time.Second})
	env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(eng, "h1")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	spec := func(name string) api.Command {
		return api.Command{Spec: &api.VmSpec{Name: name, Backend: api.BackendNoop}}
	}
	result := func(vm, cmd string, want api.EventType) {
		t.Helper()
		if ev := env.Result(vm, cmd, 30*time.Second); ev == nil || ev.Type != want {
			t.Fatalf("%s %s: %+v, want %s", vm, cmd, ev, want)
		}
	}
	purged := func(vm string) {
		t.Helper()
		env.WaitFor(vm+"'s purge", 30*time.Second, func() bool {
			evs := env.Events(vm)
			return len(evs) > 0 && evs[0].Event != nil && evs[0].Event.Action == fsm.ActPurge
		})
	}

	// Within the window: v's destroy d1, stored, purged; v again; d1 once
	// more (a new message, as a redelivery would be, with the same id).
	env.SendCmd("v", "prepare", "p1", spec("v"))
	result("v", "p1", api.TypePrepared)
	env.SendCmd("v", "destroy", "d1", api.Command{})
	result("v", "d1", api.TypeDestroyed)
	purged("v")
	env.SendCmd("v", "prepare", "p2", spec("v"))
	result("v", "p2", api.TypePrepared)
	env.Send("v", "destroy", `{"command_id":"d1"}`, "")
	env.WaitFor("the command stream's consumer to have nothing pending", 20*time.Second, func() bool {
		info, err := env.JS.Consumer(ctx, env.Names.CommandsStream(), env.Names.CommandConsumer())
		if err != nil {
			return false
		}
		i, err := info.Info(ctx)
		return err == nil && i.NumPending == 0 && i.NumAckPending == 0
	})
	for _, s := range env.Events("v") {
		if s.Event != nil && s.Event.CommandID == "d1" {
			t.Fatalf("the purged destroy d1 was decided again on the new v: %+v", s.Event)
		}
	}

	// After the window: w's command sent while w is destroyed, held (the
	// engines' consumer paused) until w is purged and the command is
	// older than half the window, then delivered.
	env.SendCmd("w", "prepare", "wp", spec("w"))
	result("w", "wp", api.TypePrepared)
	env.SendCmd("w", "destroy", "wd", api.Command{})
	result("w", "wd", api.TypeDestroyed)
	if _, err := env.JS.PauseConsumer(ctx, env.Names.CommandsStream(), env.Names.CommandConsumer(), time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	env.SendCmd("w", "prepare", "late", spec("w"))
	sent := time.Now()
	purged("w")
	time.Sleep(time.Until(sent.Add(1500 * time.Millisecond)))
	if _, err := env.JS.ResumeConsumer(ctx, env.Names.CommandsStream(), env.Names.CommandConsumer()); err != nil {
		t.Fatal(err)
	}
	ev := env.Decision("w", "late", 30*time.Second)
	if ev.Type != api.TypeRejected || !strings.Contains(ev.Reason, "before vm w was purged") {
		t.Fatalf("a command sent before its VM's purge: %+v", ev)
	}
}

// An engine that died between storing a purge and removing the VM's
// earlier events left them: the next engine to start removes them once
// its projection has folded the purge (the record is gone, so nothing
// else would come back to it).
func TestPurgeFinishedAtStartUp(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(eng, "h1")
	env.SendCmd("v", "prepare", "p1", api.Command{Spec: &api.VmSpec{Name: "v", Backend: api.BackendNoop}})
	if ev := env.Result("v", "p1", 30*time.Second); ev == nil || ev.Type != api.TypePrepared {
		t.Fatalf("prepare: %+v", ev)
	}
	env.SendCmd("v", "destroy", "d1", api.Command{})
	if ev := env.Result("v", "d1", 30*time.Second); ev == nil || ev.Type != api.TypeDestroyed {
		t.Fatalf("destroy: %+v", ev)
	}
	if err := eng.Stop(); err != nil {
		t.Fatal(err)
	}
	// The dead engine's last act: the purge's decision, stored as an
	// engine stores it, and nothing after.
	evs := env.Events("v")
	before := len(evs)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ev := api.Event{Type: api.TypeAccepted, VM: "v", CommandID: "pg1", Action: fsm.ActPurge, State: api.StateDestroyed, Time: time.Now().UTC()}
	if _, _, err := env.Store.Append(ctx, &ev, evs[len(evs)-1].Seq, api.DecisionMsgID("v", "pg1")); err != nil {
		t.Fatal(err)
	}
	if n := len(env.Events("v")); n != before+1 {
		t.Fatalf("%d events before the restart, want %d", n, before+1)
	}
	env.StartEngine(testenv.EngineConfig{ID: "e2"})
	env.WaitFor("the purged vm's earlier events to be removed", 30*time.Second, func() bool {
		evs := env.Events("v")
		return len(evs) == 1 && evs[0].Event != nil && evs[0].Event.CommandID == "pg1"
	})
}

package projection

import (
	"testing"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
)

// TestFoldMigrate: the switch moves the VM to its destination with the
// copy's handle and back to the state it had; a failure keeps it where
// it was; results and phases count only from the writers the decision
// named.
func TestFoldMigrate(t *testing.T) {
	h1 := &api.VmHandle{ID: "a", Name: "web1", Backend: api.BackendQEMU, Host: "h1", PID: 10}
	h2 := &api.VmHandle{ID: "b", Name: "web1", Backend: api.BackendQEMU, Host: "h2", PID: 20}
	base := &api.VmRecord{Name: "web1", State: api.StateSuspended, Host: "h1", Backend: api.BackendQEMU, Handle: h1, Generation: 1, LastSeq: 5}
	m := &api.Migration{From: "h1", To: "h2", Mode: api.MigrateLive, Before: api.StateSuspended}
	accepted := &api.Event{Type: api.TypeAccepted, VM: "web1", CommandID: "m1", Action: fsm.ActMigrate, State: api.StateMigrating,
		Host: "h1", Handle: h1, Migration: m, Writer: api.EngineWriter}
	r := Fold(base, accepted, 6)
	if r.State != api.StateMigrating || r.Migration == nil || r.Migration.To != "h2" || len(r.InFlight) != 1 {
		t.Fatalf("accepted: %+v", r)
	}
	phase := func(writer, p string) *api.Event {
		x := m.Clone()
		x.Phase, x.Bytes, x.Total = p, 5, 10
		return &api.Event{Type: api.TypeMigration, VM: "web1", CommandID: "m1", Action: fsm.ActMigrate, Host: writer, Migration: x, Writer: writer}
	}
	if got := Fold(r, phase("h9", api.PhaseTargetReady), 7); got.Migration.Phase != "" {
		t.Fatalf("a phase from a host the decision did not name counted: %+v", got.Migration)
	}
	r = Fold(r, phase("h2", api.PhaseTargetReady), 7)
	if r.Migration.Phase != api.PhaseTargetReady || r.Migration.Bytes != 5 {
		t.Fatalf("the target's phase: %+v", r.Migration)
	}
	switched := &api.Event{Type: api.TypeMigrated, VM: "web1", CommandID: "m1", Action: fsm.ActMigrate, Host: "h2",
		State: api.StateSuspended, Handle: h2, Migration: m}
	forged := *switched
	forged.Writer = "h2" // the destination may not write the switch: the source does
	if got := Fold(r, &forged, 8); got.State != api.StateMigrating || got.Host != "h1" {
		t.Fatalf("a switch from the destination counted: %+v", got)
	}
	switched.Writer = "h1"
	done := Fold(r, switched, 8)
	if done.State != api.StateSuspended || done.Host != "h2" || done.Handle.ID != "b" || done.Migration != nil || len(done.InFlight) != 0 {
		t.Fatalf("after the switch: %+v", done)
	}
	failed := &api.Event{Type: api.TypeFailed, VM: "web1", CommandID: "m1", Action: fsm.ActMigrate, Host: "h1",
		State: api.StateSuspended, Handle: h1, Error: "migrate vm web1: boom", Migration: m, Writer: "h1"}
	back := Fold(r, failed, 8)
	if back.State != api.StateSuspended || back.Host != "h1" || back.Handle.ID != "a" || back.Migration != nil || back.LastError == "" {
		t.Fatalf("after a failed migrate: %+v", back)
	}
	// The rival of a stored switch answers nothing.
	if got := Fold(done, failed, 9); got.Host != "h2" || got.State != api.StateSuspended {
		t.Fatalf("a failure after the switch moved the vm: %+v", got)
	}
}

package api

import (
	"errors"
	"testing"
)

// The record's helpers answer from its state, and Allows asks the state
// machine (the engine's own rules).
func TestRecordHelpers(t *testing.T) {
	var none *VmRecord
	if none.Exists() || none.Live() || none.Destroyed() || none.CurrentState() != StateAbsent {
		t.Fatal("a nil record is no VM")
	}
	if err := none.Allows(ActPrepare); err != nil {
		t.Fatalf("prepare of a name with no record: %v", err)
	}
	if err := none.Allows(ActStart); err == nil {
		t.Fatal("start of a name with no record is allowed")
	}
	run := &VmRecord{Name: "a", State: StateRunning, InFlight: []InFlight{{CommandID: "c1", Action: ActStop}}}
	if !run.Live() || run.Destroyed() || run.InFlightCommand().CommandID != "c1" {
		t.Fatalf("running: live %v destroyed %v in flight %+v", run.Live(), run.Destroyed(), run.InFlightCommand())
	}
	if err := run.Allows(ActStop); err != nil {
		t.Fatalf("stop of a running VM: %v", err)
	}
	var fe *FieldError
	if err := run.Allows(ActResume); err == nil || errors.As(err, &fe) {
		t.Fatalf("resume of a running VM: %v (want the machine's rejection)", err)
	}
	gone := &VmRecord{Name: "a", State: StateDestroyed}
	if gone.Live() || !gone.Destroyed() || !gone.Exists() {
		t.Fatal("destroyed: exists, not live")
	}
	if err := gone.Allows(ActPrepare); err != nil {
		t.Fatalf("prepare of a destroyed name: %v", err)
	}
	// The writer rule: decisions from an engine only; results from an
	// engine or the VM's host's worker.
	r := &VmRecord{Name: "a", State: StateStarting, Host: "h1"}
	for _, c := range []struct {
		ev   Event
		want bool
	}{
		{Event{Type: TypeAccepted, Writer: EngineWriter}, true},
		{Event{Type: TypeStarted, Writer: "h1"}, true},
		{Event{Type: TypeStarted, Writer: "h2"}, false},
		{Event{Type: TypeAccepted, Writer: "h1"}, false},
		{Event{Type: TypeStarted, Writer: ""}, true},
	} {
		if got := r.Trusts(&c.ev); got != c.want {
			t.Errorf("Trusts(%s by %q) = %v, want %v", c.ev.Type, c.ev.Writer, got, c.want)
		}
	}
}

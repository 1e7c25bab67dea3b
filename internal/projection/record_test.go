package projection

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/vm"
)

type step struct {
	typ    events.Type
	action string
	cmd    string
	handle *vm.VmHandle
}

func fold(t *testing.T, steps []step) *VmRecord {
	t.Helper()
	var r *VmRecord
	for i, s := range steps {
		ev := &events.Event{Type: s.typ, VM: "v", Action: fsm.Action(s.action), CommandID: s.cmd, Handle: s.handle,
			Time: time.Unix(int64(i), 0).UTC(), Host: "h1", Backend: vm.BackendNoop}
		if s.typ == events.TypeExited {
			ev.Reason = "killed"
		}
		r = Fold(r, ev, uint64(i+1))
	}
	return r
}

func TestFoldLifecycle(t *testing.T) {
	h1 := &vm.VmHandle{ID: "a", Name: "v", PID: 10}
	r := fold(t, []step{
		{events.TypeAccepted, "prepare", "c1", nil},
		{events.TypePrepared, "prepare", "c1", &vm.VmHandle{ID: "a", Name: "v"}},
		{events.TypeAccepted, "start", "c2", nil},
		{events.TypeStarted, "start", "c2", h1},
	})
	if r.State != vm.StateRunning || r.Handle.PID != 10 || len(r.InFlight) != 0 || r.Generation != 1 || r.LastSeq != 4 {
		t.Fatalf("record %+v", r)
	}
}

// Destroy overtakes a start in flight: the late started result is recorded
// as a fact but does not move the state; destroyed does.
func TestFoldDestroyWins(t *testing.T) {
	r := fold(t, []step{
		{events.TypeAccepted, "prepare", "c1", nil},
		{events.TypePrepared, "prepare", "c1", &vm.VmHandle{ID: "a", Name: "v"}},
		{events.TypeAccepted, "start", "c2", nil},
		{events.TypeAccepted, "destroy", "c3", nil},
		{events.TypeStarted, "start", "c2", &vm.VmHandle{ID: "a", Name: "v", PID: 7}},
	})
	if r.State != vm.StateDestroying || r.Handle.PID != 7 || len(r.InFlight) != 1 {
		t.Fatalf("after late started: %+v", r)
	}
	r = Fold(r, &events.Event{Type: events.TypeDestroyed, VM: "v", CommandID: "c3", Action: "destroy"}, r.LastSeq+1)
	if r.State != vm.StateDestroyed || len(r.InFlight) != 0 {
		t.Fatalf("after destroyed: %+v", r)
	}
}

// A late exited observation of an older incarnation never touches the new one.
func TestFoldStaleExited(t *testing.T) {
	old := &vm.VmHandle{ID: "old", Name: "v", PID: 10}
	r := fold(t, []step{
		{events.TypeAccepted, "prepare", "c1", nil},
		{events.TypePrepared, "prepare", "c1", &vm.VmHandle{ID: "old", Name: "v"}},
		{events.TypeAccepted, "start", "c2", nil},
		{events.TypeStarted, "start", "c2", old},
		{events.TypeAccepted, "destroy", "c3", nil},
		{events.TypeDestroyed, "destroy", "c3", old},
		{events.TypeAccepted, "prepare", "c4", nil},
		{events.TypePrepared, "prepare", "c4", &vm.VmHandle{ID: "new", Name: "v"}},
		{events.TypeAccepted, "start", "c5", nil},
		{events.TypeStarted, "start", "c5", &vm.VmHandle{ID: "new", Name: "v", PID: 10}},
		{events.TypeExited, "", "", old}, // same PID, other incarnation
	})
	if r.State != vm.StateRunning || r.Handle.ID != "new" || r.Handle.PID != 10 {
		t.Fatalf("stale exit changed the record: %+v", r)
	}
	r = Fold(r, &events.Event{Type: events.TypeExited, VM: "v", Handle: &vm.VmHandle{ID: "new", Name: "v", PID: 11}}, r.LastSeq+1)
	if r.State != vm.StateRunning {
		t.Fatalf("exit with another pid changed the record: %+v", r)
	}
	r = Fold(r, &events.Event{Type: events.TypeExited, VM: "v", Reason: "killed", Handle: &vm.VmHandle{ID: "new", Name: "v", PID: 10}}, r.LastSeq+1)
	if r.State != vm.StateStopped || r.Handle.PID != 0 || r.LastError == "" {
		t.Fatalf("current exit not applied: %+v", r)
	}
}

// Folding is idempotent: an event at or below LastSeq changes nothing.
func TestFoldIdempotent(t *testing.T) {
	r := fold(t, []step{{events.TypeAccepted, "prepare", "c1", nil}})
	again := Fold(r, &events.Event{Type: events.TypeAccepted, VM: "v", Action: "prepare", CommandID: "c1"}, 1)
	if again != r {
		t.Fatal("refolding an applied event changed the record")
	}
}

// FuzzFold: any sequence of events folds without panicking, into a record
// whose state is one of the FSM's and whose JSON round-trips.
func FuzzFold(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, "prepare")
	f.Add([]byte{0, 0, 9, 9, 3}, "start")
	f.Add([]byte{}, "")
	types := events.Types
	actions := append([]string{"bogus", ""}, func() []string {
		var s []string
		for _, a := range fsm.Actions {
			s = append(s, string(a))
		}
		return s
	}()...)
	f.Fuzz(func(t *testing.T, ops []byte, action string) {
		var r *VmRecord
		for i, op := range ops {
			ev := &events.Event{
				Type:      types[int(op)%len(types)],
				VM:        "v",
				Action:    fsm.Action(actions[int(op/16)%len(actions)]),
				CommandID: string(rune('a' + op%5)),
			}
			if op%3 == 0 {
				ev.Handle = &vm.VmHandle{ID: string(rune('x' + op%2)), Name: "v", PID: int(op % 4)}
			}
			if i == 0 && action != "" {
				ev.Action = fsm.Action(action)
			}
			r = Fold(r, ev, uint64(i+1))
			if r == nil {
				t.Fatal("fold returned nil for a real event")
			}
			if _, err := fsm.Decide(r.CurrentState(), fsm.ActDestroy); err != nil {
				if _, ok := err.(*fsm.Rejection); !ok {
					t.Fatalf("state %q is not an FSM state", r.State)
				}
			}
			var back VmRecord
			if err := json.Unmarshal(r.Marshal(), &back); err != nil {
				t.Fatal(err)
			}
		}
	})
}

package projection

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
)

type step struct {
	typ    api.EventType
	action string
	cmd    string
	handle *api.VmHandle
}

func fold(t *testing.T, steps []step) *api.VmRecord {
	t.Helper()
	var r *api.VmRecord
	for i, s := range steps {
		ev := &api.Event{Type: s.typ, VM: "v", Action: fsm.Action(s.action), CommandID: s.cmd, Handle: s.handle,
			Time: time.Unix(int64(i), 0).UTC(), Host: "h1", Backend: api.BackendNoop}
		if s.typ == api.TypeExited {
			ev.Reason = "killed"
		}
		r = Fold(r, ev, uint64(i+1))
	}
	return r
}

func TestFoldLifecycle(t *testing.T) {
	h1 := &api.VmHandle{ID: "a", Name: "v", PID: 10}
	r := fold(t, []step{
		{api.TypeAccepted, "prepare", "c1", nil},
		{api.TypePrepared, "prepare", "c1", &api.VmHandle{ID: "a", Name: "v"}},
		{api.TypeAccepted, "start", "c2", nil},
		{api.TypeStarted, "start", "c2", h1},
	})
	if r.State != api.StateRunning || r.Handle.PID != 10 || len(r.InFlight) != 0 || r.Generation != 1 || r.LastSeq != 4 {
		t.Fatalf("record %+v", r)
	}
}

// Destroy overtakes a start in flight: the late started result is recorded
// as a fact but does not move the state; destroyed does.
func TestFoldDestroyWins(t *testing.T) {
	r := fold(t, []step{
		{api.TypeAccepted, "prepare", "c1", nil},
		{api.TypePrepared, "prepare", "c1", &api.VmHandle{ID: "a", Name: "v"}},
		{api.TypeAccepted, "start", "c2", nil},
		{api.TypeAccepted, "destroy", "c3", nil},
		{api.TypeStarted, "start", "c2", &api.VmHandle{ID: "a", Name: "v", PID: 7}},
	})
	if r.State != api.StateDestroying || r.Handle.PID != 7 || len(r.InFlight) != 1 {
		t.Fatalf("after late started: %+v", r)
	}
	r = Fold(r, &api.Event{Type: api.TypeDestroyed, VM: "v", CommandID: "c3", Action: "destroy"}, r.LastSeq+1)
	if r.State != api.StateDestroyed || len(r.InFlight) != 0 {
		t.Fatalf("after destroyed: %+v", r)
	}
}

// A late exited observation of an older incarnation never touches the new one.
func TestFoldStaleExited(t *testing.T) {
	old := &api.VmHandle{ID: "old", Name: "v", PID: 10}
	r := fold(t, []step{
		{api.TypeAccepted, "prepare", "c1", nil},
		{api.TypePrepared, "prepare", "c1", &api.VmHandle{ID: "old", Name: "v"}},
		{api.TypeAccepted, "start", "c2", nil},
		{api.TypeStarted, "start", "c2", old},
		{api.TypeAccepted, "destroy", "c3", nil},
		{api.TypeDestroyed, "destroy", "c3", old},
		{api.TypeAccepted, "prepare", "c4", nil},
		{api.TypePrepared, "prepare", "c4", &api.VmHandle{ID: "new", Name: "v"}},
		{api.TypeAccepted, "start", "c5", nil},
		{api.TypeStarted, "start", "c5", &api.VmHandle{ID: "new", Name: "v", PID: 10}},
		{api.TypeExited, "", "", old}, // same PID, other incarnation
	})
	if r.State != api.StateRunning || r.Handle.ID != "new" || r.Handle.PID != 10 {
		t.Fatalf("stale exit changed the record: %+v", r)
	}
	r = Fold(r, &api.Event{Type: api.TypeExited, VM: "v", Handle: &api.VmHandle{ID: "new", Name: "v", PID: 11}}, r.LastSeq+1)
	if r.State != api.StateRunning {
		t.Fatalf("exit with another pid changed the record: %+v", r)
	}
	r = Fold(r, &api.Event{Type: api.TypeExited, VM: "v", Reason: "killed", Handle: &api.VmHandle{ID: "new", Name: "v", PID: 10}}, r.LastSeq+1)
	if r.State != api.StateStopped || r.Handle.PID != 0 || r.LastError == "" {
		t.Fatalf("current exit not applied: %+v", r)
	}
}

// Folding is idempotent: an event at or below LastSeq changes nothing.
func TestFoldIdempotent(t *testing.T) {
	r := fold(t, []step{{api.TypeAccepted, "prepare", "c1", nil}})
	again := Fold(r, &api.Event{Type: api.TypeAccepted, VM: "v", Action: "prepare", CommandID: "c1"}, 1)
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
	types := api.EventTypes
	actions := append([]string{"bogus", ""}, func() []string {
		var s []string
		for _, a := range fsm.Actions {
			s = append(s, string(a))
		}
		return s
	}()...)
	f.Fuzz(func(t *testing.T, ops []byte, action string) {
		var r *api.VmRecord
		for i, op := range ops {
			ev := &api.Event{
				Type:      types[int(op)%len(types)],
				VM:        "v",
				Action:    fsm.Action(actions[int(op/16)%len(actions)]),
				CommandID: string(rune('a' + op%5)),
			}
			if op%3 == 0 {
				ev.Handle = &api.VmHandle{ID: string(rune('x' + op%2)), Name: "v", PID: int(op % 4)}
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
			var back api.VmRecord
			if err := json.Unmarshal(r.Marshal(), &back); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// A forget ends the record from any state, a destroy in flight included:
// the abandoned commands' failed results and the fencing report change
// nothing, and the next prepare starts a new incarnation with its spec's
// resources.
func TestFoldForget(t *testing.T) {
	at := func(i int) time.Time { return time.Unix(int64(i), 0).UTC() }
	spec := &api.VmSpec{Vcpus: 2, MemoryMB: 1024}
	evs := []*api.Event{
		{Type: api.TypeAccepted, VM: "v", Action: fsm.ActPrepare, CommandID: "c1", Host: "h1", Backend: api.BackendQEMU, Spec: spec},
		{Type: api.TypePrepared, VM: "v", Action: fsm.ActPrepare, CommandID: "c1", Host: "h1", Handle: &api.VmHandle{ID: "a", Name: "v"}},
		{Type: api.TypeAccepted, VM: "v", Action: fsm.ActDestroy, CommandID: "d1", Host: "h1"},
		{Type: api.TypeAccepted, VM: "v", Action: fsm.ActDestroy, CommandID: "f1", Host: "h1", Forget: true,
			Abandoned: []api.Abandoned{{CommandID: "d1", Action: fsm.ActDestroy, Seq: 3}}},
		{Type: api.TypeFailed, VM: "v", Action: fsm.ActDestroy, CommandID: "d1", Host: "h1", Error: "abandoned"},
		{Type: api.TypeDestroyed, VM: "v", Action: fsm.ActDestroy, CommandID: "f1", Host: "h1", Reason: "forgotten: host h1 is lost"},
		{Type: api.TypeFenced, VM: "v", Action: fsm.ActDestroy, CommandID: "f1", Host: "h1", Reason: "removed"},
	}
	var r *api.VmRecord
	for i, ev := range evs {
		ev.Time = at(i)
		r = Fold(r, ev, uint64(i+1))
		if i == 3 && (r.State != api.StateDestroying || len(r.InFlight) != 1 || r.InFlight[0].CommandID != "f1") {
			t.Fatalf("after the forget: %+v", r)
		}
	}
	if r.State != api.StateDestroyed || r.InFlight != nil || r.LastError != "forgotten: host h1 is lost" {
		t.Fatalf("forgotten record: %+v", r)
	}
	if r.Vcpus != 2 || r.MemoryMB != 1024 {
		t.Fatalf("resources %d/%d, want 2/1024", r.Vcpus, r.MemoryMB)
	}
	r = Fold(r, &api.Event{Type: api.TypeAccepted, VM: "v", Action: fsm.ActPrepare, CommandID: "c9", Host: "h2",
		Backend: api.BackendNoop, Time: at(9)}, 9)
	if r.State != api.StatePreparing || r.Host != "h2" || r.Generation != 2 || r.Vcpus != 0 {
		t.Fatalf("prepared again elsewhere: %+v", r)
	}
}

// Only an engine decides, and only the VM's host's worker (or an engine)
// answers: an event another host's worker wrote, on its own writer token,
// is folded as nothing.
func TestFoldTrustsOnlyTheVMsHost(t *testing.T) {
	at := time.Unix(1, 0).UTC()
	r := Fold(nil, &api.Event{Type: api.TypeAccepted, VM: "v", Action: fsm.ActPrepare, CommandID: "c1", Host: "h2",
		Backend: api.BackendNoop, Time: at, Writer: api.EngineWriter}, 1)
	forged := []*api.Event{
		{Type: api.TypePrepared, VM: "v", Action: fsm.ActPrepare, CommandID: "c1", Host: "h2", Time: at, Writer: "h1",
			Handle: &api.VmHandle{ID: "x", Name: "v"}},
		{Type: api.TypeAccepted, VM: "v", Action: fsm.ActDestroy, CommandID: "c2", Host: "h2", Time: at, Writer: "h1"},
		{Type: api.TypeFailed, VM: "v", Action: fsm.ActPrepare, CommandID: "c1", Host: "h2", Time: at, Writer: "h1", Error: "forged"},
	}
	for i, ev := range forged {
		next := Fold(r, ev, uint64(2+i))
		if next.State != api.StatePreparing || next.Handle != nil || len(next.InFlight) != 1 || next.LastError != "" {
			t.Fatalf("a %s written by h1 moved a VM on h2: %+v", ev.Type, next)
		}
		r = next
	}
	r = Fold(r, &api.Event{Type: api.TypePrepared, VM: "v", Action: fsm.ActPrepare, CommandID: "c1", Host: "h2", Time: at,
		Writer: "h2", Handle: &api.VmHandle{ID: "a", Name: "v"}}, 9)
	if r.State != api.StatePrepared || r.Handle.ID != "a" {
		t.Fatalf("the VM's own host's result: %+v", r)
	}
	// Forged observations and results move only the sequence: not
	// last_event, not updated_at (issue #22, item 8).
	later := at.Add(time.Hour)
	for i, ev := range []*api.Event{
		{Type: api.TypeExited, VM: "v", Time: later, Writer: "h1", Handle: &api.VmHandle{ID: "a", Name: "v"}, Reason: "forged"},
		{Type: api.TypeDestroyed, VM: "v", Action: fsm.ActDestroy, CommandID: "c9", Host: "h1", Time: later, Writer: "h1"},
	} {
		next := Fold(r, ev, uint64(10+i))
		if next.LastSeq != uint64(10+i) || next.LastEvent != api.TypePrepared || !next.UpdatedAt.Equal(at) || next.State != api.StatePrepared {
			t.Fatalf("a %s written by h1 about a VM on h2: last_seq %d, last_event %s, updated_at %s, state %s",
				ev.Type, next.LastSeq, next.LastEvent, next.UpdatedAt, next.State)
		}
		r = next
	}
}

// The accepted prepare's labels are the record's, through the VM's life;
// the next incarnation's prepare replaces them (or clears them); the
// record does not share the event's map.
func TestFoldLabels(t *testing.T) {
	ev := func(typ api.EventType, action, cmd string, labels map[string]string) *api.Event {
		e := &api.Event{Type: typ, VM: "v", Action: fsm.Action(action), CommandID: cmd, Host: "h1", Backend: api.BackendNoop, Time: time.Unix(1, 0).UTC()}
		if typ == api.TypeAccepted && action == "prepare" {
			e.Spec = &api.VmSpec{Name: "v", Vcpus: 1, MemoryMB: 512, Labels: labels}
		}
		return e
	}
	first := map[string]string{"team": "ci", "job": "17"}
	var r *api.VmRecord
	for i, e := range []*api.Event{
		ev(api.TypeAccepted, "prepare", "c1", first),
		ev(api.TypePrepared, "prepare", "c1", nil),
		ev(api.TypeAccepted, "start", "c2", nil),
		ev(api.TypeStarted, "start", "c2", nil),
	} {
		r = Fold(r, e, uint64(i+1))
	}
	if len(r.Labels) != 2 || r.Labels["team"] != "ci" || r.Labels["job"] != "17" {
		t.Fatalf("labels after the first incarnation's start: %v", r.Labels)
	}
	first["team"] = "changed"
	if r.Labels["team"] != "ci" {
		t.Fatal("the record shares the event's labels map")
	}
	// Through the JSON of the bucket.
	back, err := api.UnmarshalRecord(r.Marshal())
	if err != nil || back.Labels["job"] != "17" {
		t.Fatalf("labels through the bucket: %v, %v", back, err)
	}
	r = Fold(r, ev(api.TypeAccepted, "destroy", "c3", nil), 5)
	r = Fold(r, ev(api.TypeDestroyed, "destroy", "c3", nil), 6)
	if r.Labels["job"] != "17" {
		t.Fatalf("a destroyed record keeps its labels (list --all shows them): %v", r.Labels)
	}
	r = Fold(r, ev(api.TypeAccepted, "prepare", "c4", map[string]string{"job": "18"}), 7)
	if len(r.Labels) != 1 || r.Labels["job"] != "18" {
		t.Fatalf("the next incarnation's labels: %v", r.Labels)
	}
	r = Fold(r, ev(api.TypeAccepted, "destroy", "c5", nil), 8)
	r = Fold(r, ev(api.TypeDestroyed, "destroy", "c5", nil), 9)
	r = Fold(r, ev(api.TypeAccepted, "prepare", "c6", nil), 10)
	if r.Labels != nil {
		t.Fatalf("a prepare without labels clears them: %v", r.Labels)
	}
}

// A purge's fold is what the purge alone folds to: the name absent, no
// generation, labels or handle left; a later prepare starts a new VM
// (generation 1) from it, as a rebuild from the purged stream would.
func TestFoldPurge(t *testing.T) {
	r := fold(t, []step{
		{api.TypeAccepted, "prepare", "c1", nil},
		{api.TypePrepared, "prepare", "c1", &api.VmHandle{ID: "a", Name: "v"}},
		{api.TypeAccepted, "destroy", "c2", nil},
		{api.TypeDestroyed, "destroy", "c2", nil},
	})
	if r.State != api.StateDestroyed || r.Generation != 1 {
		t.Fatalf("before the purge: %+v", r)
	}
	purge := &api.Event{Type: api.TypeAccepted, VM: "v", Action: fsm.ActPurge, CommandID: "p1", Time: time.Unix(9, 0).UTC(), Host: "h1", State: api.StateDestroyed}
	after := Fold(r, purge, 10)
	alone := Fold(nil, purge, 10)
	if after.Exists() || after.CurrentState() != fsm.StateAbsent || after.LastSeq != 10 || after.Generation != 0 || after.Handle != nil || after.Host != "" {
		t.Fatalf("after the purge: %+v", after)
	}
	if string(after.Marshal()) != string(alone.Marshal()) {
		t.Fatalf("the purge's fold depends on what came before:\n%s\n%s", after.Marshal(), alone.Marshal())
	}
	again := Fold(after, &api.Event{Type: api.TypeAccepted, VM: "v", Action: fsm.ActPrepare, CommandID: "c3", Time: time.Unix(11, 0).UTC(), Host: "h2", Issuer: "alice",
		Spec: &api.VmSpec{Name: "v", Vcpus: 1, MemoryMB: 128}}, 11)
	if again.State != api.StatePreparing || again.Generation != 1 || again.Host != "h2" {
		t.Fatalf("a prepare after the purge: %+v", again)
	}
	// A purge of a VM that is not destroyed cannot come from a correct
	// engine; were it stored, the fold would still end the record the
	// same way (every projector agrees), which is why admission alone
	// guards it.
	if r := Fold(again, purge, 12); r.Exists() {
		t.Fatalf("a purge folds to absent from any state: %+v", r)
	}
}

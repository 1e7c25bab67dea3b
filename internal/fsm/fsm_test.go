package fsm

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

var update = flag.Bool("update", false, "rewrite docs/fsm.dot from Graph()")

// allStates is every state Decide and Apply know, written out here rather
// than taken from the package so the tests do not trust what they test.
var allStates = []State{
	StateAbsent,
	StatePreparing, StatePrepared,
	StateStarting, StateRunning,
	StateStopping, StateStopped,
	StateSuspending, StateSuspended,
	StateResuming,
	StateDestroying, StateDestroyed,
	StateFailed,
	StateMigrating,
}

// accepts is the docs/contract.md table: for each state, the actions it accepts and
// the in-flight state each leads to. Anything missing is rejected.
var accepts = map[State]map[Action]State{
	StateAbsent:     {ActPrepare: StatePreparing},
	StatePreparing:  {ActDestroy: StateDestroying},
	StatePrepared:   {ActStart: StateStarting, ActDestroy: StateDestroying, ActMigrate: StateMigrating},
	StateStarting:   {ActDestroy: StateDestroying},
	StateRunning:    {ActStop: StateStopping, ActSuspend: StateSuspending, ActDestroy: StateDestroying, ActMigrate: StateMigrating},
	StateStopping:   {ActDestroy: StateDestroying},
	StateStopped:    {ActStart: StateStarting, ActDestroy: StateDestroying, ActMigrate: StateMigrating},
	StateSuspending: {ActDestroy: StateDestroying},
	StateSuspended:  {ActStop: StateStopping, ActResume: StateResuming, ActDestroy: StateDestroying, ActMigrate: StateMigrating},
	StateResuming:   {ActDestroy: StateDestroying},
	StateDestroying: {},
	StateDestroyed:  {ActPrepare: StatePreparing, ActPurge: StateAbsent},
	StateFailed:     {ActStart: StateStarting, ActDestroy: StateDestroying},
	StateMigrating:  {},
}

// moves is how results change each state. Anything missing leaves the state
// as it is.
var moves = map[State]map[Result]State{
	StateAbsent:     {},
	StatePreparing:  {ResPrepared: StatePrepared, ResFailed: StateFailed},
	StatePrepared:   {},
	StateStarting:   {ResStarted: StateRunning, ResFailed: StateFailed},
	StateRunning:    {ResExited: StateStopped},
	StateStopping:   {ResStopped: StateStopped, ResFailed: StateFailed},
	StateStopped:    {},
	StateSuspending: {ResSuspended: StateSuspended, ResFailed: StateFailed},
	StateSuspended:  {ResExited: StateStopped},
	StateResuming:   {ResResumed: StateRunning, ResFailed: StateFailed},
	StateDestroying: {ResDestroyed: StateDestroyed, ResFailed: StateFailed},
	StateDestroyed:  {},
	StateFailed:     {},
	// Settle, not Apply, moves a migrating VM (TestSettle).
	StateMigrating: {},
}

var transitional = map[State]bool{
	StatePreparing: true, StateStarting: true, StateStopping: true,
	StateSuspending: true, StateResuming: true, StateDestroying: true,
	StateMigrating: true,
}

func TestDecideEveryPair(t *testing.T) {
	for _, s := range allStates {
		for _, a := range Actions {
			t.Run(string(s)+"/"+string(a), func(t *testing.T) {
				want, ok := accepts[s][a]
				got, err := Decide(s, a)
				if ok {
					if err != nil {
						t.Fatalf("Decide(%s, %s) = %v, want accepted into %s", s, a, err, want)
					}
					if got != want {
						t.Fatalf("Decide(%s, %s) = %s, want %s", s, a, got, want)
					}
					if !Transitional(got) && a != ActPurge {
						// Purge alone is done when decided (no result).
						t.Errorf("Decide(%s, %s) = %s, which is not in flight", s, a, got)
					}
					return
				}
				if err == nil {
					t.Fatalf("Decide(%s, %s) = %s, want rejected", s, a, got)
				}
				if got != "" {
					t.Errorf("rejected Decide(%s, %s) returned state %q, want empty", s, a, got)
				}
				var rej *Rejection
				if !errors.As(err, &rej) {
					t.Fatalf("Decide(%s, %s) error %T, want *Rejection", s, a, err)
				}
				if rej.State != s || rej.Action != a {
					t.Errorf("Rejection names %s/%s, want %s/%s", rej.State, rej.Action, s, a)
				}
				if rej.InFlight != transitional[s] {
					t.Errorf("Rejection.InFlight = %v, want %v", rej.InFlight, transitional[s])
				}
				if !slices.Equal(rej.Allowed, Allowed(a)) {
					t.Errorf("Rejection.Allowed = %v, want %v", rej.Allowed, Allowed(a))
				}
				checkMessage(t, rej)
			})
		}
	}
}

// checkMessage: a rejection names the current state and, unless a command
// is in flight, every state the action is allowed from.
func checkMessage(t *testing.T, rej *Rejection) {
	t.Helper()
	msg := rej.Error()
	if !strings.HasPrefix(msg, "cannot "+string(rej.Action)+": ") {
		t.Errorf("message %q does not start with the action", msg)
	}
	if rej.State == StateAbsent {
		if !strings.Contains(msg, "vm does not exist") {
			t.Errorf("message %q does not say the vm does not exist", msg)
		}
	} else if !strings.Contains(msg, "vm is "+string(rej.State)) && !strings.Contains(msg, "vm is already "+string(rej.State)) {
		t.Errorf("message %q does not name state %s", msg, rej.State)
	}
	if rej.InFlight {
		if !strings.Contains(msg, "in flight") {
			t.Errorf("message %q does not say a command is in flight", msg)
		}
		return
	}
	allowedPart := msg[strings.Index(msg, ";"):]
	for _, s := range rej.Allowed {
		if !strings.Contains(allowedPart, string(s)) {
			t.Errorf("message %q does not name allowed state %s", msg, s)
		}
	}
}

func TestRejectionMessages(t *testing.T) {
	for _, tc := range []struct {
		state  State
		action Action
		want   string
	}{
		{StateStopped, ActSuspend, "cannot suspend: vm is stopped; suspend is allowed from running"},
		{StateStarting, ActStart, "cannot start: vm is starting (a command is in flight); only destroy is accepted until it finishes"},
		{StateResuming, ActStop, "cannot stop: vm is resuming (a command is in flight); only destroy is accepted until it finishes"},
		{StateAbsent, ActStart, "cannot start: vm does not exist; start is allowed from prepared, stopped, failed"},
		{StateAbsent, ActDestroy, "cannot destroy: vm does not exist; destroy is allowed from preparing, prepared, starting, running, stopping, stopped, suspending, suspended, resuming, failed"},
		{StateDestroyed, ActDestroy, "cannot destroy: vm is already destroyed; destroy is allowed from preparing, prepared, starting, running, stopping, stopped, suspending, suspended, resuming, failed"},
		{StateDestroying, ActDestroy, "cannot destroy: vm is already destroying; wait for the destroy in flight to finish"},
		{StateRunning, ActStart, "cannot start: vm is already running; start is allowed from prepared, stopped, failed"},
		{StateRunning, ActPrepare, "cannot prepare: vm is running; prepare is allowed from absent, destroyed"},
		{StateSuspended, ActSuspend, "cannot suspend: vm is already suspended; suspend is allowed from running"},
		{"bogus", ActStart, `cannot start: vm is in unknown state "bogus"; start is allowed from prepared, stopped, failed`},
		{StateRunning, "reboot", "cannot reboot: unknown action (valid: prepare, start, stop, suspend, resume, destroy, migrate, purge)"},
		{StateRunning, ActPurge, "cannot purge: vm is running; purge is allowed from destroyed"},
		{StateDestroying, ActPurge, "cannot purge: vm is destroying (a command is in flight); only destroy is accepted until it finishes"},
		{StateAbsent, ActPurge, "cannot purge: vm does not exist; purge is allowed from destroyed"},
		{StateMigrating, ActDestroy, "cannot destroy: vm is migrating (a command is in flight); until the migration ends only its cancel is accepted (vmctl migrate --cancel)"},
		{StateStarting, ActMigrate, "cannot migrate: vm is starting (a command is in flight); only destroy is accepted until it finishes"},
		{StateFailed, ActMigrate, "cannot migrate: vm is failed; migrate is allowed from prepared, running, stopped, suspended"},
	} {
		_, err := Decide(tc.state, tc.action)
		if err == nil {
			t.Errorf("Decide(%s, %s) accepted, want %q", tc.state, tc.action, tc.want)
			continue
		}
		if got := err.Error(); got != tc.want {
			t.Errorf("Decide(%s, %s):\n got %q\nwant %q", tc.state, tc.action, got, tc.want)
		}
	}
}

func TestApplyEveryPair(t *testing.T) {
	for _, s := range allStates {
		for _, r := range Results {
			want, moved := moves[s][r]
			if !moved {
				want = s
			}
			got, changed := Apply(s, r)
			if got != want || changed != moved {
				t.Errorf("Apply(%s, %s) = (%s, %v), want (%s, %v)", s, r, got, changed, want, moved)
			}
		}
	}
}

func TestApplyUnknown(t *testing.T) {
	for _, tc := range []struct {
		state  State
		result Result
	}{
		{"", ResStarted},
		{"bogus", ResFailed},
		{StateStarting, ""},
		{StateStarting, "rejected"},
	} {
		if got, changed := Apply(tc.state, tc.result); got != tc.state || changed {
			t.Errorf("Apply(%q, %q) = (%q, %v), want unchanged", tc.state, tc.result, got, changed)
		}
	}
}

// TestDestroyWinsInFlight is docs/contract.md's "destroy is queued behind the
// in-flight task and wins": every in-flight state but destroying accepts it
// (and migrating: a migration is cancelled, not overtaken).
func TestDestroyWinsInFlight(t *testing.T) {
	for s := range transitional {
		got, err := Decide(s, ActDestroy)
		if s == StateDestroying || s == StateMigrating {
			if err == nil {
				t.Errorf("Decide(destroying, destroy) accepted")
			}
			continue
		}
		if err != nil || got != StateDestroying {
			t.Errorf("Decide(%s, destroy) = (%s, %v), want destroying", s, got, err)
		}
	}
}

func TestAllowed(t *testing.T) {
	want := map[Action][]State{
		ActPrepare: {StateAbsent, StateDestroyed},
		ActStart:   {StatePrepared, StateStopped, StateFailed},
		ActStop:    {StateRunning, StateSuspended},
		ActSuspend: {StateRunning},
		ActResume:  {StateSuspended},
		ActDestroy: {
			StatePreparing, StatePrepared, StateStarting, StateRunning,
			StateStopping, StateStopped, StateSuspending, StateSuspended,
			StateResuming, StateFailed,
		},
		ActMigrate: {StatePrepared, StateRunning, StateStopped, StateSuspended},
		ActPurge:   {StateDestroyed},
	}
	for _, a := range Actions {
		if got := Allowed(a); !slices.Equal(got, want[a]) {
			t.Errorf("Allowed(%s) = %v, want %v", a, got, want[a])
		}
	}
	if got := Allowed("reboot"); got != nil {
		t.Errorf("Allowed(reboot) = %v, want nil", got)
	}
	// The slice is the caller's: changing it changes nothing here.
	a := Allowed(ActStart)
	a[0] = "mangled"
	if Allowed(ActStart)[0] != StatePrepared {
		t.Errorf("Allowed returned shared storage")
	}
}

func TestTransitional(t *testing.T) {
	for _, s := range append(allStates, "", "bogus") {
		if got := Transitional(s); got != transitional[s] {
			t.Errorf("Transitional(%q) = %v, want %v", s, got, transitional[s])
		}
	}
}

// TestIndexes keeps the lookup switches in line with the lists.
func TestIndexes(t *testing.T) {
	if !slices.Equal(states[:], allStates) {
		t.Errorf("states = %v, want %v", states, allStates)
	}
	for i, s := range states {
		if stateIndex(s) != i {
			t.Errorf("stateIndex(%s) = %d, want %d", s, stateIndex(s), i)
		}
	}
	for i, a := range Actions {
		if actionIndex(a) != i {
			t.Errorf("actionIndex(%s) = %d, want %d", a, actionIndex(a), i)
		}
	}
	for i, r := range Results {
		if resultIndex(r) != i {
			t.Errorf("resultIndex(%s) = %d, want %d", r, resultIndex(r), i)
		}
	}
}

func TestGraphGolden(t *testing.T) {
	path := filepath.Join("..", "..", "docs", "fsm.dot")
	got := Graph()
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading %s (run go test ./internal/fsm -update to write it): %v", path, err)
	}
	if got != string(want) {
		t.Errorf("Graph() differs from %s; run go test ./internal/fsm -update and review the diff\ngot:\n%s", path, got)
	}
}

func TestNoAllocs(t *testing.T) {
	if n := testing.AllocsPerRun(1000, func() {
		if _, err := Decide(StateRunning, ActStop); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("Decide accept path: %v allocs, want 0", n)
	}
	if n := testing.AllocsPerRun(1000, func() {
		if _, ok := Apply(StateStarting, ResStarted); !ok {
			t.Fatal("Apply(starting, started) did not move")
		}
	}); n != 0 {
		t.Errorf("Apply move path: %v allocs, want 0", n)
	}
	if n := testing.AllocsPerRun(1000, func() {
		if _, ok := Apply(StateStopping, ResExited); ok {
			t.Fatal("Apply(stopping, exited) moved")
		}
	}); n != 0 {
		t.Errorf("Apply ignore path: %v allocs, want 0", n)
	}
}

func TestConcurrentUse(t *testing.T) {
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 1000 {
				if got, err := Decide(StateSuspended, ActResume); err != nil || got != StateResuming {
					errs <- "Decide(suspended, resume) wrong"
					return
				}
				if got, _ := Apply(StateResuming, ResResumed); got != StateRunning {
					errs <- "Apply(resuming, resumed) wrong"
					return
				}
				if _, err := Decide(StateStopped, ActSuspend); err == nil {
					errs <- "Decide(stopped, suspend) accepted"
					return
				}
				_ = Graph()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

func BenchmarkDecide(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decide(StateRunning, ActSuspend); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkApply(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := Apply(StateSuspending, ResSuspended); !ok {
			b.Fatal("no move")
		}
	}
}

// BenchmarkLifecycle folds a whole prepare..destroy life, as a projection
// rebuild does.
func BenchmarkLifecycle(b *testing.B) {
	type step struct {
		a Action
		r Result
	}
	life := []step{
		{ActPrepare, ResPrepared}, {ActStart, ResStarted}, {ActSuspend, ResSuspended},
		{ActResume, ResResumed}, {ActStop, ResStopped}, {ActStart, ResStarted},
		{"", ResExited}, {ActDestroy, ResDestroyed},
	}
	b.ReportAllocs()
	for b.Loop() {
		s := StateAbsent
		for _, st := range life {
			if st.a != "" {
				var err error
				if s, err = Decide(s, st.a); err != nil {
					b.Fatal(err)
				}
			}
			s, _ = Apply(s, st.r)
		}
		if s != StateDestroyed {
			b.Fatalf("ended in %s", s)
		}
	}
}

// TestSettle: a migrate's result returns the VM to the state it had, on
// its new host or its old one; nothing else moves a migrating VM.
func TestSettle(t *testing.T) {
	for _, before := range []State{StateRunning, StateSuspended, StatePrepared, StateStopped} {
		for _, r := range []Result{ResMigrated, ResFailed} {
			if got, ok := Settle(StateMigrating, before, r); !ok || got != before {
				t.Errorf("Settle(migrating, %s, %s) = %s, %v; want %s", before, r, got, ok, before)
			}
		}
		for _, r := range Results {
			if r == ResMigrated || r == ResFailed {
				continue
			}
			if got, ok := Settle(StateMigrating, before, r); ok || got != StateMigrating {
				t.Errorf("Settle(migrating, %s, %s) = %s, %v; want unchanged", before, r, got, ok)
			}
		}
	}
	// A before that cannot have been migrated moves nothing.
	if got, ok := Settle(StateMigrating, StateFailed, ResMigrated); ok {
		t.Errorf("Settle(migrating, failed, migrated) = %s, want unchanged", got)
	}
	// Outside migrating, Settle is Apply.
	for _, s := range allStates {
		for _, r := range Results {
			g1, ok1 := Settle(s, StateRunning, r)
			g2, ok2 := Apply(s, r)
			if s != StateMigrating && (g1 != g2 || ok1 != ok2) {
				t.Errorf("Settle(%s, running, %s) = %s, %v; Apply = %s, %v", s, r, g1, ok1, g2, ok2)
			}
		}
	}
	if !Live(StateRunning) || !Live(StateSuspended) || Live(StateStopped) || Live(StatePrepared) {
		t.Error("Live: running and suspended move live, prepared and stopped cold")
	}
}

// Pending and Outcome agree with the machine: an accepted action moves to
// Pending, and its success result moves Pending to Outcome.
func TestPendingOutcome(t *testing.T) {
	for _, a := range Actions {
		p := a.Pending()
		if a == ActPurge {
			// Done when decided: no in-flight state, its decision's state
			// is its outcome.
			if got, err := Decide(StateDestroyed, a); p != "" || err != nil || got != a.Outcome() {
				t.Errorf("purge: Pending() = %q, Decide(destroyed) = %s, %v; Outcome() = %s", p, got, err, a.Outcome())
			}
			continue
		}
		if p == "" || !Transitional(p) {
			t.Errorf("%s.Pending() = %q, want a transitional state", a, p)
		}
		if a == ActMigrate {
			continue // Settle: back to the state it had
		}
		if got, ok := Apply(p, a.Success()); !ok || got != a.Outcome() {
			t.Errorf("%s: Apply(%s, %s) = %s, %v; Outcome() = %s", a, p, a.Success(), got, ok, a.Outcome())
		}
	}
}

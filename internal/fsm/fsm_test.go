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

	"github.com/vmherd/vmherd/internal/vm"
)

var update = flag.Bool("update", false, "rewrite docs/fsm.dot from Graph()")

// allStates is every state Decide and Apply know, written out here rather
// than taken from the package so the tests do not trust what they test.
var allStates = []vm.VmState{
	StateAbsent,
	vm.StatePreparing, vm.StatePrepared,
	vm.StateStarting, vm.StateRunning,
	vm.StateStopping, vm.StateStopped,
	vm.StateSuspending, vm.StateSuspended,
	vm.StateResuming,
	vm.StateDestroying, vm.StateDestroyed,
	vm.StateFailed,
	vm.StateMigrating,
}

// accepts is the docs/contract.md table: for each state, the actions it accepts and
// the in-flight state each leads to. Anything missing is rejected.
var accepts = map[vm.VmState]map[Action]vm.VmState{
	StateAbsent:        {ActPrepare: vm.StatePreparing},
	vm.StatePreparing:  {ActDestroy: vm.StateDestroying},
	vm.StatePrepared:   {ActStart: vm.StateStarting, ActDestroy: vm.StateDestroying, ActMigrate: vm.StateMigrating},
	vm.StateStarting:   {ActDestroy: vm.StateDestroying},
	vm.StateRunning:    {ActStop: vm.StateStopping, ActSuspend: vm.StateSuspending, ActDestroy: vm.StateDestroying, ActMigrate: vm.StateMigrating},
	vm.StateStopping:   {ActDestroy: vm.StateDestroying},
	vm.StateStopped:    {ActStart: vm.StateStarting, ActDestroy: vm.StateDestroying, ActMigrate: vm.StateMigrating},
	vm.StateSuspending: {ActDestroy: vm.StateDestroying},
	vm.StateSuspended:  {ActStop: vm.StateStopping, ActResume: vm.StateResuming, ActDestroy: vm.StateDestroying, ActMigrate: vm.StateMigrating},
	vm.StateResuming:   {ActDestroy: vm.StateDestroying},
	vm.StateDestroying: {},
	vm.StateDestroyed:  {ActPrepare: vm.StatePreparing, ActPurge: StateAbsent},
	vm.StateFailed:     {ActStart: vm.StateStarting, ActDestroy: vm.StateDestroying},
	vm.StateMigrating:  {},
}

// moves is how results change each state. Anything missing leaves the state
// as it is.
var moves = map[vm.VmState]map[Result]vm.VmState{
	StateAbsent:        {},
	vm.StatePreparing:  {ResPrepared: vm.StatePrepared, ResFailed: vm.StateFailed},
	vm.StatePrepared:   {},
	vm.StateStarting:   {ResStarted: vm.StateRunning, ResFailed: vm.StateFailed},
	vm.StateRunning:    {ResExited: vm.StateStopped},
	vm.StateStopping:   {ResStopped: vm.StateStopped, ResFailed: vm.StateFailed},
	vm.StateStopped:    {},
	vm.StateSuspending: {ResSuspended: vm.StateSuspended, ResFailed: vm.StateFailed},
	vm.StateSuspended:  {ResExited: vm.StateStopped},
	vm.StateResuming:   {ResResumed: vm.StateRunning, ResFailed: vm.StateFailed},
	vm.StateDestroying: {ResDestroyed: vm.StateDestroyed, ResFailed: vm.StateFailed},
	vm.StateDestroyed:  {},
	vm.StateFailed:     {},
	// Settle, not Apply, moves a migrating VM (TestSettle).
	vm.StateMigrating: {},
}

var transitional = map[vm.VmState]bool{
	vm.StatePreparing: true, vm.StateStarting: true, vm.StateStopping: true,
	vm.StateSuspending: true, vm.StateResuming: true, vm.StateDestroying: true,
	vm.StateMigrating: true,
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
		state  vm.VmState
		action Action
		want   string
	}{
		{vm.StateStopped, ActSuspend, "cannot suspend: vm is stopped; suspend is allowed from running"},
		{vm.StateStarting, ActStart, "cannot start: vm is starting (a command is in flight); only destroy is accepted until it finishes"},
		{vm.StateResuming, ActStop, "cannot stop: vm is resuming (a command is in flight); only destroy is accepted until it finishes"},
		{StateAbsent, ActStart, "cannot start: vm does not exist; start is allowed from prepared, stopped, failed"},
		{StateAbsent, ActDestroy, "cannot destroy: vm does not exist; destroy is allowed from preparing, prepared, starting, running, stopping, stopped, suspending, suspended, resuming, failed"},
		{vm.StateDestroyed, ActDestroy, "cannot destroy: vm is already destroyed; destroy is allowed from preparing, prepared, starting, running, stopping, stopped, suspending, suspended, resuming, failed"},
		{vm.StateDestroying, ActDestroy, "cannot destroy: vm is already destroying; wait for the destroy in flight to finish"},
		{vm.StateRunning, ActStart, "cannot start: vm is already running; start is allowed from prepared, stopped, failed"},
		{vm.StateRunning, ActPrepare, "cannot prepare: vm is running; prepare is allowed from absent, destroyed"},
		{vm.StateSuspended, ActSuspend, "cannot suspend: vm is already suspended; suspend is allowed from running"},
		{"bogus", ActStart, `cannot start: vm is in unknown state "bogus"; start is allowed from prepared, stopped, failed`},
		{vm.StateRunning, "reboot", "cannot reboot: unknown action (valid: prepare, start, stop, suspend, resume, destroy, migrate, purge)"},
		{vm.StateRunning, ActPurge, "cannot purge: vm is running; purge is allowed from destroyed"},
		{vm.StateDestroying, ActPurge, "cannot purge: vm is destroying (a command is in flight); only destroy is accepted until it finishes"},
		{StateAbsent, ActPurge, "cannot purge: vm does not exist; purge is allowed from destroyed"},
		{vm.StateMigrating, ActDestroy, "cannot destroy: vm is migrating (a command is in flight); until the migration ends only its cancel is accepted (vmctl migrate --cancel)"},
		{vm.StateStarting, ActMigrate, "cannot migrate: vm is starting (a command is in flight); only destroy is accepted until it finishes"},
		{vm.StateFailed, ActMigrate, "cannot migrate: vm is failed; migrate is allowed from prepared, running, stopped, suspended"},
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
		state  vm.VmState
		result Result
	}{
		{"", ResStarted},
		{"bogus", ResFailed},
		{vm.StateStarting, ""},
		{vm.StateStarting, "rejected"},
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
		if s == vm.StateDestroying || s == vm.StateMigrating {
			if err == nil {
				t.Errorf("Decide(destroying, destroy) accepted")
			}
			continue
		}
		if err != nil || got != vm.StateDestroying {
			t.Errorf("Decide(%s, destroy) = (%s, %v), want destroying", s, got, err)
		}
	}
}

func TestAllowed(t *testing.T) {
	want := map[Action][]vm.VmState{
		ActPrepare: {StateAbsent, vm.StateDestroyed},
		ActStart:   {vm.StatePrepared, vm.StateStopped, vm.StateFailed},
		ActStop:    {vm.StateRunning, vm.StateSuspended},
		ActSuspend: {vm.StateRunning},
		ActResume:  {vm.StateSuspended},
		ActDestroy: {
			vm.StatePreparing, vm.StatePrepared, vm.StateStarting, vm.StateRunning,
			vm.StateStopping, vm.StateStopped, vm.StateSuspending, vm.StateSuspended,
			vm.StateResuming, vm.StateFailed,
		},
		ActMigrate: {vm.StatePrepared, vm.StateRunning, vm.StateStopped, vm.StateSuspended},
		ActPurge:   {vm.StateDestroyed},
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
	if Allowed(ActStart)[0] != vm.StatePrepared {
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

func TestParseAction(t *testing.T) {
	for _, a := range Actions {
		got, err := ParseAction(string(a))
		if err != nil || got != a {
			t.Errorf("ParseAction(%q) = (%q, %v)", a, got, err)
		}
	}
	for _, s := range []string{"", "Start", "reboot", " stop"} {
		_, err := ParseAction(s)
		if !errors.Is(err, vm.ErrInvalid) {
			t.Fatalf("ParseAction(%q) error %v, want vm.ErrInvalid", s, err)
		}
		msg := err.Error()
		if !strings.HasPrefix(msg, "action: ") {
			t.Errorf("ParseAction(%q) error %q does not name the field", s, msg)
		}
		for _, a := range Actions {
			if !strings.Contains(msg, string(a)) {
				t.Errorf("ParseAction(%q) error %q does not list %s", s, msg, a)
			}
		}
	}
}

func TestParseResult(t *testing.T) {
	for _, r := range Results {
		got, err := ParseResult(string(r))
		if err != nil || got != r {
			t.Errorf("ParseResult(%q) = (%q, %v)", r, got, err)
		}
	}
	if _, err := ParseResult("rejected"); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("ParseResult(rejected) error %v, want vm.ErrInvalid", err)
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
		if _, err := Decide(vm.StateRunning, ActStop); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("Decide accept path: %v allocs, want 0", n)
	}
	if n := testing.AllocsPerRun(1000, func() {
		if _, ok := Apply(vm.StateStarting, ResStarted); !ok {
			t.Fatal("Apply(starting, started) did not move")
		}
	}); n != 0 {
		t.Errorf("Apply move path: %v allocs, want 0", n)
	}
	if n := testing.AllocsPerRun(1000, func() {
		if _, ok := Apply(vm.StateStopping, ResExited); ok {
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
				if got, err := Decide(vm.StateSuspended, ActResume); err != nil || got != vm.StateResuming {
					errs <- "Decide(suspended, resume) wrong"
					return
				}
				if got, _ := Apply(vm.StateResuming, ResResumed); got != vm.StateRunning {
					errs <- "Apply(resuming, resumed) wrong"
					return
				}
				if _, err := Decide(vm.StateStopped, ActSuspend); err == nil {
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
		if _, err := Decide(vm.StateRunning, ActSuspend); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkApply(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := Apply(vm.StateSuspending, ResSuspended); !ok {
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
		if s != vm.StateDestroyed {
			b.Fatalf("ended in %s", s)
		}
	}
}

// TestSettle: a migrate's result returns the VM to the state it had, on
// its new host or its old one; nothing else moves a migrating VM.
func TestSettle(t *testing.T) {
	for _, before := range []vm.VmState{vm.StateRunning, vm.StateSuspended, vm.StatePrepared, vm.StateStopped} {
		for _, r := range []Result{ResMigrated, ResFailed} {
			if got, ok := Settle(vm.StateMigrating, before, r); !ok || got != before {
				t.Errorf("Settle(migrating, %s, %s) = %s, %v; want %s", before, r, got, ok, before)
			}
		}
		for _, r := range Results {
			if r == ResMigrated || r == ResFailed {
				continue
			}
			if got, ok := Settle(vm.StateMigrating, before, r); ok || got != vm.StateMigrating {
				t.Errorf("Settle(migrating, %s, %s) = %s, %v; want unchanged", before, r, got, ok)
			}
		}
	}
	// A before that cannot have been migrated moves nothing.
	if got, ok := Settle(vm.StateMigrating, vm.StateFailed, ResMigrated); ok {
		t.Errorf("Settle(migrating, failed, migrated) = %s, want unchanged", got)
	}
	// Outside migrating, Settle is Apply.
	for _, s := range allStates {
		for _, r := range Results {
			g1, ok1 := Settle(s, vm.StateRunning, r)
			g2, ok2 := Apply(s, r)
			if s != vm.StateMigrating && (g1 != g2 || ok1 != ok2) {
				t.Errorf("Settle(%s, running, %s) = %s, %v; Apply = %s, %v", s, r, g1, ok1, g2, ok2)
			}
		}
	}
	if !Live(vm.StateRunning) || !Live(vm.StateSuspended) || Live(vm.StateStopped) || Live(vm.StatePrepared) {
		t.Error("Live: running and suspended move live, prepared and stopped cold")
	}
}

// Package fsm is the per-VM state machine of docs/contract.md: which command may be
// accepted in which state, and how a command's result (or an observation
// such as `exited`) moves the state on. It is pure: no I/O, no clock, no
// goroutines.
//
// The rules are written once, as a github.com/qmuntal/stateless machine
// (see define). At package init that machine is probed for every
// (state, trigger) pair and the answers are stored in a small array, so
// Decide and Apply are array lookups that neither allocate nor lock, and the
// package is safe for concurrent use. Graph renders the same definition.
package fsm

import (
	"context"
	"fmt"
	"strings"

	"github.com/qmuntal/stateless"

	"github.com/vmherd/vmherd/internal/vm"
)

// Action is a command a user can ask of a VM.
type Action string

const (
	ActPrepare Action = "prepare"
	ActStart   Action = "start"
	ActStop    Action = "stop"
	ActSuspend Action = "suspend"
	ActResume  Action = "resume"
	ActDestroy Action = "destroy"
	// ActMigrate moves the VM to another host: live when it is running or
	// suspended, cold (its disk) when it is prepared or stopped.
	ActMigrate Action = "migrate"
	// ActPurge removes a destroyed VM's record and its events: the name
	// is absent again. Unlike every other action it has no task and no
	// result: its decision is its outcome (the engine then removes the
	// VM's earlier events; see docs/contract.md, "Purge").
	ActPurge Action = "purge"
)

// Actions lists every action, in a stable order.
var Actions = []Action{ActPrepare, ActStart, ActStop, ActSuspend, ActResume, ActDestroy, ActMigrate, ActPurge}

// ParseAction turns a user string into an Action.
func ParseAction(s string) (Action, error) {
	if a := Action(s); actionIndex(a) >= 0 {
		return a, nil
	}
	return "", &vm.FieldError{
		Field: "action",
		Rule:  fmt.Sprintf("unknown action %q (valid: %s)", s, joinActions(Actions)),
	}
}

// Result is the type of an event that reports what happened to a VM: the
// outcome of a command, or an observation (`exited`).
type Result string

const (
	ResPrepared  Result = "prepared"
	ResStarted   Result = "started"
	ResStopped   Result = "stopped"
	ResSuspended Result = "suspended"
	ResResumed   Result = "resumed"
	ResDestroyed Result = "destroyed"
	ResFailed    Result = "failed"
	ResExited    Result = "exited"
	// ResMigrated ends a migrate that moved the VM: the switch of its host.
	ResMigrated Result = "migrated"
)

// Results lists every result, in a stable order.
var Results = []Result{ResPrepared, ResStarted, ResStopped, ResSuspended, ResResumed, ResDestroyed, ResFailed, ResExited, ResMigrated}

// ParseResult turns an event type into a Result.
func ParseResult(s string) (Result, error) {
	if r := Result(s); resultIndex(r) >= 0 {
		return r, nil
	}
	names := make([]string, len(Results))
	for i, r := range Results {
		names[i] = string(r)
	}
	return "", &vm.FieldError{
		Field: "result",
		Rule:  fmt.Sprintf("unknown result %q (valid: %s)", s, strings.Join(names, ", ")),
	}
}

// StateAbsent is the pseudo-state of a name no VM has (never prepared).
// Only prepare is accepted from it. It is never stored in a record.
const StateAbsent vm.VmState = "absent"

// states lists every state Decide and Apply know, StateAbsent first, in the
// order docs/contract.md lists them. Allowed and rejection messages use this order.
var states = [...]vm.VmState{
	StateAbsent,
	vm.StatePreparing,
	vm.StatePrepared,
	vm.StateStarting,
	vm.StateRunning,
	vm.StateStopping,
	vm.StateStopped,
	vm.StateSuspending,
	vm.StateSuspended,
	vm.StateResuming,
	vm.StateDestroying,
	vm.StateDestroyed,
	vm.StateFailed,
	vm.StateMigrating,
}

// define writes the rules of docs/contract.md "The per-VM state machine" into sm.
// It is the single source of truth: the lookup table and the graph are both
// derived from it.
func define(sm *stateless.StateMachine) {
	// Commands. Each goes to its in-flight state; from an in-flight state
	// only destroy is accepted (it is queued behind the task and wins).
	sm.Configure(StateAbsent).
		Permit(ActPrepare, vm.StatePreparing)
	sm.Configure(vm.StatePreparing).
		Permit(ActDestroy, vm.StateDestroying).
		Permit(ResPrepared, vm.StatePrepared).
		Permit(ResFailed, vm.StateFailed)
	sm.Configure(vm.StatePrepared).
		Permit(ActStart, vm.StateStarting).
		Permit(ActDestroy, vm.StateDestroying).
		Permit(ActMigrate, vm.StateMigrating)
	sm.Configure(vm.StateStarting).
		Permit(ActDestroy, vm.StateDestroying).
		Permit(ResStarted, vm.StateRunning).
		Permit(ResFailed, vm.StateFailed)
	sm.Configure(vm.StateRunning).
		Permit(ActStop, vm.StateStopping).
		Permit(ActSuspend, vm.StateSuspending).
		Permit(ActDestroy, vm.StateDestroying).
		Permit(ActMigrate, vm.StateMigrating).
		Permit(ResExited, vm.StateStopped)
	sm.Configure(vm.StateStopping).
		Permit(ActDestroy, vm.StateDestroying).
		Permit(ResStopped, vm.StateStopped).
		Permit(ResFailed, vm.StateFailed).
		// The guest exiting is how a stop ends; the stop's own result
		// settles the state.
		Ignore(ResExited)
	sm.Configure(vm.StateStopped).
		Permit(ActStart, vm.StateStarting).
		Permit(ActDestroy, vm.StateDestroying).
		Permit(ActMigrate, vm.StateMigrating)
	sm.Configure(vm.StateSuspending).
		Permit(ActDestroy, vm.StateDestroying).
		Permit(ResSuspended, vm.StateSuspended).
		Permit(ResFailed, vm.StateFailed)
	sm.Configure(vm.StateSuspended).
		Permit(ActStop, vm.StateStopping).
		Permit(ActResume, vm.StateResuming).
		Permit(ActDestroy, vm.StateDestroying).
		Permit(ActMigrate, vm.StateMigrating).
		Permit(ResExited, vm.StateStopped)
	sm.Configure(vm.StateResuming).
		Permit(ActDestroy, vm.StateDestroying).
		Permit(ResResumed, vm.StateRunning).
		Permit(ResFailed, vm.StateFailed)
	sm.Configure(vm.StateDestroying).
		Permit(ResDestroyed, vm.StateDestroyed).
		Permit(ResFailed, vm.StateFailed).
		// As for stopping: destroy kills the guest, and the destroy's
		// result settles the state.
		Ignore(ResExited)
	sm.Configure(vm.StateDestroyed).
		Permit(ActPrepare, vm.StatePreparing).
		// Purge is done when it is decided: the VM is absent again.
		Permit(ActPurge, StateAbsent)
	sm.Configure(vm.StateFailed).
		Permit(ActStart, vm.StateStarting).
		Permit(ActDestroy, vm.StateDestroying)
	// A migration ends where it began, in the state the VM had, on its
	// new host (migrated) or its old one (failed): Settle, not this
	// table, moves it out. Nothing else is accepted meanwhile, not even
	// destroy (cancel the migration first); the source's QEMU exiting
	// fails the migration, whose result settles the state.
	sm.Configure(vm.StateMigrating).
		Ignore(ResExited)
}

const (
	numStates   = len(states)
	numActions  = 8
	numResults  = 9
	numTriggers = numActions + numResults // actions, then results
	noMove      = -1                      // the trigger is not handled in that state
)

// table holds, for each state and trigger, the index of the next state, or
// noMove. An ignored trigger maps a state to itself.
var table [numStates][numTriggers]int8

// allowed holds Allowed(a) for each action, in states order.
var allowed [numActions][]vm.VmState

// graph is the DOT rendering of the machine.
var graph string

func init() {
	if len(Actions) != numActions || len(Results) != numResults {
		panic("fsm: numActions or numResults does not match Actions and Results")
	}
	triggers := make([]stateless.Trigger, 0, numTriggers)
	for _, a := range Actions {
		triggers = append(triggers, a)
	}
	for _, r := range Results {
		triggers = append(triggers, r)
	}

	// Probe a machine whose state lives in probe: set the state, ask, fire,
	// read the state back.
	var probe vm.VmState
	sm := stateless.NewStateMachineWithExternalStorage(
		func(context.Context) (stateless.State, error) { return probe, nil },
		func(_ context.Context, s stateless.State) error { probe = s.(vm.VmState); return nil },
		stateless.FiringImmediate,
	)
	define(sm)
	for si, s := range states {
		for ti, t := range triggers {
			probe = s
			table[si][ti] = noMove
			ok, err := sm.CanFire(t)
			if err != nil {
				panic(fmt.Sprintf("fsm: probing %s in %s: %v", t, s, err))
			}
			if !ok {
				continue
			}
			if err := sm.Fire(t); err != nil {
				panic(fmt.Sprintf("fsm: firing %s in %s: %v", t, s, err))
			}
			ni := stateIndex(probe)
			if ni < 0 {
				panic(fmt.Sprintf("fsm: %s in %s leads to unknown state %q", t, s, probe))
			}
			if ti < numActions && !isTransitional(probe) && t != ActPurge {
				panic(fmt.Sprintf("fsm: action %s in %s leads to %s, which is not in flight", t, s, probe))
			}
			table[si][ti] = int8(ni)
		}
	}
	for ai := range numActions {
		for si, s := range states {
			if n := table[si][ai]; n != noMove && int(n) != si {
				allowed[ai] = append(allowed[ai], s)
			}
		}
	}

	// The graph comes from the same definition, with the initial state at
	// absent.
	gm := stateless.NewStateMachine(StateAbsent)
	define(gm)
	graph = gm.ToGraph()
}

// Decide says whether action a may be accepted in state cur. If it may, it
// returns the in-flight state the VM moves to (for ActPurge, which has no
// result, StateAbsent: the state its decision leaves); if not, the error is a
// *Rejection naming cur and the states a is allowed from.
func Decide(cur vm.VmState, a Action) (vm.VmState, error) {
	si, ai := stateIndex(cur), actionIndex(a)
	if si >= 0 && ai >= 0 {
		if n := table[si][ai]; n != noMove && int(n) != si {
			return states[n], nil
		}
	}
	return "", &Rejection{State: cur, Action: a, Allowed: Allowed(a), InFlight: isTransitional(cur)}
}

// Forget decides a destroy that forgets a VM whose host is lost for good:
// it is accepted from every state of an existing VM but destroyed (a
// destroy already in flight included, since its host will never answer),
// and moves the VM to destroying like any destroy.
func Forget(cur vm.VmState) (vm.VmState, error) {
	switch cur {
	case StateAbsent, vm.StateDestroyed, "":
		return Decide(cur, ActDestroy)
	}
	return vm.StateDestroying, nil
}

// Apply folds result r into state cur and reports whether the state changed.
// The caller feeds it only results that answer the command the current
// in-flight state waits for, and `exited` observations about the current
// incarnation. A result that does not fit the state leaves it unchanged.
func Apply(cur vm.VmState, r Result) (vm.VmState, bool) {
	si, ri := stateIndex(cur), resultIndex(r)
	if si < 0 || ri < 0 {
		return cur, false
	}
	n := table[si][numActions+ri]
	if n == noMove || int(n) == si {
		return cur, false
	}
	return states[n], true
}

// Settle folds the result of a migrate into a migrating VM: migrated
// (the VM now runs on its new host) and failed (it stayed on its old
// one) both return it to before, the state it had when the migrate was
// accepted. Any other state or result is Apply's.
func Settle(cur, before vm.VmState, r Result) (vm.VmState, bool) {
	if cur != vm.StateMigrating {
		return Apply(cur, r)
	}
	if (r == ResMigrated || r == ResFailed) && Migratable(before) {
		return before, true
	}
	return cur, false
}

// Migratable reports whether a VM in state s may be migrated, and Live
// whether it moves live (its guest keeps running or stays suspended,
// memory and all) rather than cold (its disk only).
func Migratable(s vm.VmState) bool {
	switch s {
	case vm.StateRunning, vm.StateSuspended, vm.StatePrepared, vm.StateStopped:
		return true
	}
	return false
}

// Live reports whether a migrate from state s moves the guest live.
func Live(s vm.VmState) bool { return s == vm.StateRunning || s == vm.StateSuspended }

// Allowed returns the states action a is accepted from, in a stable order.
// The slice is the caller's to keep. An unknown action is allowed nowhere.
func Allowed(a Action) []vm.VmState {
	ai := actionIndex(a)
	if ai < 0 {
		return nil
	}
	return append([]vm.VmState(nil), allowed[ai]...)
}

// Transitional reports whether s is an in-flight state: one a command has
// moved the VM to and its result will move it out of.
func Transitional(s vm.VmState) bool { return isTransitional(s) }

func isTransitional(s vm.VmState) bool {
	switch s {
	case vm.StatePreparing, vm.StateStarting, vm.StateStopping,
		vm.StateSuspending, vm.StateResuming, vm.StateDestroying, vm.StateMigrating:
		return true
	}
	return false
}

// Graph returns the machine as a Graphviz DOT graph (docs/fsm.dot).
func Graph() string { return graph }

// Rejection is why Decide refused an action. It carries what a `rejected`
// event needs.
type Rejection struct {
	State    vm.VmState   // the VM's state when the action arrived
	Action   Action       // the action refused
	Allowed  []vm.VmState // the states Action is accepted from
	InFlight bool         // State is in flight: only destroy is accepted until it ends
}

func (r *Rejection) Error() string {
	var b strings.Builder
	b.WriteString("cannot ")
	b.WriteString(string(r.Action))
	b.WriteString(": ")
	switch {
	case actionIndex(r.Action) < 0:
		fmt.Fprintf(&b, "unknown action (valid: %s)", joinActions(Actions))
		return b.String()
	case r.State == StateAbsent:
		b.WriteString("vm does not exist")
	case stateIndex(r.State) < 0:
		fmt.Fprintf(&b, "vm is in unknown state %q", r.State)
	case r.State == vm.StateMigrating:
		b.WriteString("vm is migrating (a command is in flight); until the migration ends only its cancel is accepted (vmctl migrate --cancel)")
		return b.String()
	case r.InFlight && r.Action == ActDestroy:
		// Only destroying itself refuses destroy while in flight.
		fmt.Fprintf(&b, "vm is already %s; wait for the destroy in flight to finish", r.State)
		return b.String()
	case r.InFlight:
		fmt.Fprintf(&b, "vm is %s (a command is in flight); only destroy is accepted until it finishes", r.State)
		return b.String()
	case r.State == outcome(r.Action):
		fmt.Fprintf(&b, "vm is already %s", r.State)
	default:
		fmt.Fprintf(&b, "vm is %s", r.State)
	}
	fmt.Fprintf(&b, "; %s is allowed from ", r.Action)
	if len(r.Allowed) == 0 {
		b.WriteString("no state")
	}
	for i, s := range r.Allowed {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(string(s))
	}
	return b.String()
}

// Success is the result event that ends action a when its backend call
// succeeds (every accepted command ends in it or in ResFailed).
func (a Action) Success() Result {
	switch a {
	case ActPrepare:
		return ResPrepared
	case ActStart:
		return ResStarted
	case ActStop:
		return ResStopped
	case ActSuspend:
		return ResSuspended
	case ActResume:
		return ResResumed
	case ActDestroy:
		return ResDestroyed
	case ActMigrate:
		return ResMigrated
	}
	return ""
}

// IsOutcome reports whether r ends a command (all results but the
// observation ResExited).
func (r Result) IsOutcome() bool { return resultIndex(r) >= 0 && r != ResExited }

// States lists every state a VM can be in (not StateAbsent), in the order
// docs/contract.md lists them.
func States() []vm.VmState { return append([]vm.VmState(nil), states[1:]...) }

// outcome is the state action a leads to when it succeeds, used to word a
// rejection as "already".
func outcome(a Action) vm.VmState {
	switch a {
	case ActPrepare:
		return vm.StatePrepared
	case ActStart, ActResume:
		return vm.StateRunning
	case ActStop:
		return vm.StateStopped
	case ActSuspend:
		return vm.StateSuspended
	case ActDestroy:
		return vm.StateDestroyed
	}
	return ""
}

// stateIndex is the index of s in states, or -1.
func stateIndex(s vm.VmState) int {
	switch s {
	case StateAbsent:
		return 0
	case vm.StatePreparing:
		return 1
	case vm.StatePrepared:
		return 2
	case vm.StateStarting:
		return 3
	case vm.StateRunning:
		return 4
	case vm.StateStopping:
		return 5
	case vm.StateStopped:
		return 6
	case vm.StateSuspending:
		return 7
	case vm.StateSuspended:
		return 8
	case vm.StateResuming:
		return 9
	case vm.StateDestroying:
		return 10
	case vm.StateDestroyed:
		return 11
	case vm.StateFailed:
		return 12
	case vm.StateMigrating:
		return 13
	}
	return -1
}

// actionIndex is the index of a in Actions, or -1.
func actionIndex(a Action) int {
	switch a {
	case ActPrepare:
		return 0
	case ActStart:
		return 1
	case ActStop:
		return 2
	case ActSuspend:
		return 3
	case ActResume:
		return 4
	case ActDestroy:
		return 5
	case ActMigrate:
		return 6
	case ActPurge:
		return 7
	}
	return -1
}

// resultIndex is the index of r in Results, or -1.
func resultIndex(r Result) int {
	switch r {
	case ResPrepared:
		return 0
	case ResStarted:
		return 1
	case ResStopped:
		return 2
	case ResSuspended:
		return 3
	case ResResumed:
		return 4
	case ResDestroyed:
		return 5
	case ResFailed:
		return 6
	case ResExited:
		return 7
	case ResMigrated:
		return 8
	}
	return -1
}

func joinActions(as []Action) string {
	names := make([]string, len(as))
	for i, a := range as {
		names[i] = string(a)
	}
	return strings.Join(names, ", ")
}

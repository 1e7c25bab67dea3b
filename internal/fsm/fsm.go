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
	// VM's earlier events; see docs/contract.md, "Purging a destroyed VM").
	ActPurge Action = "purge"
)

// Actions lists every action, in a stable order.
var Actions = []Action{ActPrepare, ActStart, ActStop, ActSuspend, ActResume, ActDestroy, ActMigrate, ActPurge}

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

// State is what a VM is doing, as the state machine and the projection see
// it (api.VmState to clients).
type State string

// The states of docs/contract.md "The per-VM state machine".
const (
	StatePreparing  State = "preparing"
	StatePrepared   State = "prepared"
	StateStarting   State = "starting"
	StateRunning    State = "running"
	StateStopping   State = "stopping"
	StateStopped    State = "stopped"
	StateSuspending State = "suspending"
	StateSuspended  State = "suspended"
	StateResuming   State = "resuming"
	StateDestroying State = "destroying"
	StateDestroyed  State = "destroyed"
	StateFailed     State = "failed"
	// StateMigrating: a migrate is moving the VM to another host; its
	// result returns the VM to the state it had (see Settle).
	StateMigrating State = "migrating"
)

// StateAbsent is the pseudo-state of a name no VM has (never prepared).
// Only prepare is accepted from it. It is never stored in a record.
const StateAbsent State = "absent"

// states lists every state Decide and Apply know, StateAbsent first, in the
// order docs/contract.md lists them. Allowed and rejection messages use this order.
var states = [...]State{
	StateAbsent,
	StatePreparing,
	StatePrepared,
	StateStarting,
	StateRunning,
	StateStopping,
	StateStopped,
	StateSuspending,
	StateSuspended,
	StateResuming,
	StateDestroying,
	StateDestroyed,
	StateFailed,
	StateMigrating,
}

// define writes the rules of docs/contract.md "The per-VM state machine" into sm.
// It is the single source of truth: the lookup table and the graph are both
// derived from it.
func define(sm *stateless.StateMachine) {
	// Commands. Each goes to its in-flight state; from an in-flight state
	// only destroy is accepted (it is queued behind the task and wins).
	sm.Configure(StateAbsent).
		Permit(ActPrepare, StatePreparing)
	sm.Configure(StatePreparing).
		Permit(ActDestroy, StateDestroying).
		Permit(ResPrepared, StatePrepared).
		Permit(ResFailed, StateFailed)
	sm.Configure(StatePrepared).
		Permit(ActStart, StateStarting).
		Permit(ActDestroy, StateDestroying).
		Permit(ActMigrate, StateMigrating)
	sm.Configure(StateStarting).
		Permit(ActDestroy, StateDestroying).
		Permit(ResStarted, StateRunning).
		Permit(ResFailed, StateFailed)
	sm.Configure(StateRunning).
		Permit(ActStop, StateStopping).
		Permit(ActSuspend, StateSuspending).
		Permit(ActDestroy, StateDestroying).
		Permit(ActMigrate, StateMigrating).
		Permit(ResExited, StateStopped)
	sm.Configure(StateStopping).
		Permit(ActDestroy, StateDestroying).
		Permit(ResStopped, StateStopped).
		Permit(ResFailed, StateFailed).
		// The guest exiting is how a stop ends; the stop's own result
		// settles the state.
		Ignore(ResExited)
	sm.Configure(StateStopped).
		Permit(ActStart, StateStarting).
		Permit(ActDestroy, StateDestroying).
		Permit(ActMigrate, StateMigrating)
	sm.Configure(StateSuspending).
		Permit(ActDestroy, StateDestroying).
		Permit(ResSuspended, StateSuspended).
		Permit(ResFailed, StateFailed)
	sm.Configure(StateSuspended).
		Permit(ActStop, StateStopping).
		Permit(ActResume, StateResuming).
		Permit(ActDestroy, StateDestroying).
		Permit(ActMigrate, StateMigrating).
		Permit(ResExited, StateStopped)
	sm.Configure(StateResuming).
		Permit(ActDestroy, StateDestroying).
		Permit(ResResumed, StateRunning).
		Permit(ResFailed, StateFailed)
	sm.Configure(StateDestroying).
		Permit(ResDestroyed, StateDestroyed).
		Permit(ResFailed, StateFailed).
		// As for stopping: destroy kills the guest, and the destroy's
		// result settles the state.
		Ignore(ResExited)
	sm.Configure(StateDestroyed).
		Permit(ActPrepare, StatePreparing).
		// Purge is done when it is decided: the VM is absent again.
		Permit(ActPurge, StateAbsent)
	sm.Configure(StateFailed).
		Permit(ActStart, StateStarting).
		Permit(ActDestroy, StateDestroying)
	// A migration ends where it began, in the state the VM had, on its
	// new host (migrated) or its old one (failed): Settle, not this
	// table, moves it out. Nothing else is accepted meanwhile, not even
	// destroy (cancel the migration first); the source's QEMU exiting
	// fails the migration, whose result settles the state.
	sm.Configure(StateMigrating).
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
var allowed [numActions][]State

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
	var probe State
	sm := stateless.NewStateMachineWithExternalStorage(
		func(context.Context) (stateless.State, error) { return probe, nil },
		func(_ context.Context, s stateless.State) error { probe = s.(State); return nil },
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
func Decide(cur State, a Action) (State, error) {
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
func Forget(cur State) (State, error) {
	switch cur {
	case StateAbsent, StateDestroyed, "":
		return Decide(cur, ActDestroy)
	}
	return StateDestroying, nil
}

// Apply folds result r into state cur and reports whether the state changed.
// The caller feeds it only results that answer the command the current
// in-flight state waits for, and `exited` observations about the current
// incarnation. A result that does not fit the state leaves it unchanged.
func Apply(cur State, r Result) (State, bool) {
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
func Settle(cur, before State, r Result) (State, bool) {
	if cur != StateMigrating {
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
func Migratable(s State) bool {
	switch s {
	case StateRunning, StateSuspended, StatePrepared, StateStopped:
		return true
	}
	return false
}

// Live reports whether a migrate from state s moves the guest live.
func Live(s State) bool { return s == StateRunning || s == StateSuspended }

// Allowed returns the states action a is accepted from, in a stable order.
// The slice is the caller's to keep. An unknown action is allowed nowhere.
func Allowed(a Action) []State {
	ai := actionIndex(a)
	if ai < 0 {
		return nil
	}
	return append([]State(nil), allowed[ai]...)
}

// Transitional reports whether s is an in-flight state: one a command has
// moved the VM to and its result will move it out of.
func Transitional(s State) bool { return isTransitional(s) }

func isTransitional(s State) bool {
	switch s {
	case StatePreparing, StateStarting, StateStopping,
		StateSuspending, StateResuming, StateDestroying, StateMigrating:
		return true
	}
	return false
}

// Graph returns the machine as a Graphviz DOT graph (docs/fsm.dot).
func Graph() string { return graph }

// Rejection is why Decide refused an action. It carries what a `rejected`
// event needs.
type Rejection struct {
	State    State   // the VM's state when the action arrived
	Action   Action  // the action refused
	Allowed  []State // the states Action is accepted from
	InFlight bool    // State is in flight: only destroy is accepted until it ends
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
	case r.State == StateMigrating:
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
func States() []State { return append([]State(nil), states[1:]...) }

// outcome is the state action a leads to when it succeeds, used to word a
// rejection as "already".
// Outcome is the state a successful a leaves the VM in ("" for migrate,
// whose success returns the VM to the state it had: Settle; absent for
// purge, whose decision is its outcome).
func (a Action) Outcome() State { return outcome(a) }

// Pending is the in-flight state an accepted a puts the VM in, as Decide
// gives it ("" for purge, which is done when decided).
func (a Action) Pending() State {
	for _, s := range states {
		if next, err := Decide(s, a); err == nil && isTransitional(next) {
			return next
		}
	}
	return ""
}

func outcome(a Action) State {
	switch a {
	case ActPrepare:
		return StatePrepared
	case ActStart, ActResume:
		return StateRunning
	case ActStop:
		return StateStopped
	case ActSuspend:
		return StateSuspended
	case ActDestroy:
		return StateDestroyed
	case ActPurge:
		return StateAbsent
	}
	return ""
}

// stateIndex is the index of s in states, or -1.
func stateIndex(s State) int {
	switch s {
	case StateAbsent:
		return 0
	case StatePreparing:
		return 1
	case StatePrepared:
		return 2
	case StateStarting:
		return 3
	case StateRunning:
		return 4
	case StateStopping:
		return 5
	case StateStopped:
		return 6
	case StateSuspending:
		return 7
	case StateSuspended:
		return 8
	case StateResuming:
		return 9
	case StateDestroying:
		return 10
	case StateDestroyed:
		return 11
	case StateFailed:
		return 12
	case StateMigrating:
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

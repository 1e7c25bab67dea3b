package api

import (
	"fmt"
	"strings"

	"github.com/vmherd/vmherd/internal/fsm"
)

// VmState is what a VM is doing. The state machine of docs/contract.md
// owns the states and the moves between them; VmRecord's methods ask it.
type VmState = fsm.State

// The states a record can be in.
const (
	StatePreparing  = fsm.StatePreparing
	StatePrepared   = fsm.StatePrepared
	StateStarting   = fsm.StateStarting
	StateRunning    = fsm.StateRunning
	StateStopping   = fsm.StateStopping
	StateStopped    = fsm.StateStopped
	StateSuspending = fsm.StateSuspending
	StateSuspended  = fsm.StateSuspended
	StateResuming   = fsm.StateResuming
	StateDestroying = fsm.StateDestroying
	StateDestroyed  = fsm.StateDestroyed
	StateFailed     = fsm.StateFailed
	StateMigrating  = fsm.StateMigrating
	// StateAbsent is the state of a name no VM has: never prepared, or
	// only ever rejected. It is never stored in a record.
	StateAbsent = fsm.StateAbsent
)

// Action is a lifecycle command: the token after the VM name in a
// command's subject (vm.cmd.<vm>.<action>). It is the state machine's
// type (an alias, so go doc lists its methods there): a.Pending() is the
// in-flight state an accepted a puts the VM in, a.Outcome() the state its
// success leaves (StateAbsent for a purge), a.Success() the result type
// of its success.
type Action = fsm.Action

// The lifecycle commands.
const (
	ActPrepare = fsm.ActPrepare
	ActStart   = fsm.ActStart
	ActStop    = fsm.ActStop
	ActSuspend = fsm.ActSuspend
	ActResume  = fsm.ActResume
	ActDestroy = fsm.ActDestroy
	ActMigrate = fsm.ActMigrate
	// ActPurge removes a destroyed VM's record and events; its decision
	// is its outcome (no task, no result).
	ActPurge = fsm.ActPurge
)

// Actions lists every lifecycle command, in a stable order.
var Actions = fsm.Actions

// Result is the type of an event that reports what happened to a VM: the
// outcome of a command, or an observation (exited).
type Result = fsm.Result

// ParseAction turns a user string into an Action; the error is a
// *FieldError naming the valid ones.
func ParseAction(s string) (Action, error) {
	for _, a := range fsm.Actions {
		if string(a) == s {
			return a, nil
		}
	}
	names := make([]string, len(fsm.Actions))
	for i, a := range fsm.Actions {
		names[i] = string(a)
	}
	return "", &FieldError{Field: "action", Rule: fmt.Sprintf("unknown action %q (valid: %s)", s, strings.Join(names, ", "))}
}

// ParseResult turns an event type into a Result; the error is a
// *FieldError naming the valid ones.
func ParseResult(s string) (Result, error) {
	for _, r := range fsm.Results {
		if string(r) == s {
			return r, nil
		}
	}
	names := make([]string, len(fsm.Results))
	for i, r := range fsm.Results {
		names[i] = string(r)
	}
	return "", &FieldError{Field: "result", Rule: fmt.Sprintf("unknown result %q (valid: %s)", s, strings.Join(names, ", "))}
}

package client

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/api"
)

// Errors a caller can test for with errors.Is. Each is wrapped by a typed
// error (errors.As) that says more.
var (
	// ErrNoEngine: no engine is deciding commands (NoEngineError).
	ErrNoEngine = errors.New("no engine is deciding commands")
	// ErrNotFound: there is no VM of that name (RejectedError with
	// NoSuchVM, or a record that does not exist).
	ErrNotFound = errors.New("no such vm")
	// ErrNotAllowed: the server refused the identity the subject, bucket
	// or stream (a permissions violation).
	ErrNotAllowed = errors.New("not allowed")
	// ErrTimeout: the wait ended before the command's result (TimeoutError).
	ErrTimeout = errors.New("no result in time")
	// ErrNoWorker: no worker answers for the VM's host (WorkerError).
	ErrNoWorker = errors.New("no worker answers for the host")
)

// ConnectError is a failed Connect.
type ConnectError struct {
	URL string
	Err error
	// NeedsCreds: the server wants credentials the client did not give.
	NeedsCreds bool
}

func (e *ConnectError) Error() string {
	if e.NeedsCreds {
		return fmt.Sprintf("connecting to %s: %v (the server needs credentials)", e.URL, e.Err)
	}
	return fmt.Sprintf("connecting to %s: %v", e.URL, e.Err)
}

func (e *ConnectError) Unwrap() error { return e.Err }

// NoEngineError says why no engine decides commands.
type NoEngineError struct {
	Reason string
	// Stored: the command was stored before the engines went away; it
	// will be decided when one runs again (CommandID names it).
	Stored    bool
	VM        string
	Action    api.Action
	CommandID string
}

func (e *NoEngineError) Error() string {
	if e.Stored {
		return fmt.Sprintf("%s; the command %s is stored and will be decided once an engine runs", e.Reason, e.CommandID)
	}
	return e.Reason
}

func (e *NoEngineError) Is(target error) bool { return target == ErrNoEngine }

// RejectedError is an engine's rejection of a command: the state machine's
// reason, or a validation rule. Nothing was done.
type RejectedError struct {
	VM        string
	Action    api.Action
	CommandID string
	Reason    string
	// NoSuchVM: the VM has no record (it was never prepared); errors.Is
	// ErrNotFound holds.
	NoSuchVM bool
	// Event is the stored rejection.
	Event *api.Event
}

func (e *RejectedError) Error() string {
	if e.NoSuchVM {
		return fmt.Sprintf("no vm named %s; the engine rejected %s: %s", e.VM, e.Action, e.Reason)
	}
	return fmt.Sprintf("%s %s rejected: %s", e.Action, e.VM, e.Reason)
}

func (e *RejectedError) Is(target error) bool { return target == ErrNotFound && e.NoSuchVM }

// FailedError is an accepted command that failed on its host: the backend
// could not do it, or the engines gave up on a lost host.
type FailedError struct {
	VM        string
	Action    api.Action
	CommandID string
	Host      string
	Message   string
	// Event is the stored failed result.
	Event *api.Event
}

func (e *FailedError) Error() string {
	return fmt.Sprintf("%s %s failed: %s", e.Action, e.VM, e.Message)
}

// TimeoutError is a wait that ended before the result: the command is
// stored and, if Accepted, will still be carried out.
type TimeoutError struct {
	VM        string
	Action    api.Action
	CommandID string
	Accepted  bool
	Host      string // the accepted host, if accepted
	Err       error  // the context's error
}

func (e *TimeoutError) Error() string {
	if e.Accepted {
		return fmt.Sprintf("no result for %s %s yet: it was accepted on host %s (command %s) and will still be carried out", e.Action, e.VM, e.Host, e.CommandID)
	}
	return fmt.Sprintf("no decision on %s %s yet: it is stored as command %s and will still be decided", e.Action, e.VM, e.CommandID)
}

func (e *TimeoutError) Is(target error) bool { return target == ErrTimeout }
func (e *TimeoutError) Unwrap() error        { return e.Err }

// NotFoundError is a read of a VM that has no record.
type NotFoundError struct{ VM string }

func (e *NotFoundError) Error() string        { return fmt.Sprintf("no vm named %s", e.VM) }
func (e *NotFoundError) Is(target error) bool { return target == ErrNotFound }

// WorkerError is a worker's answer that it cannot do what was asked (Code
// 404: no such VM on the host, 409: not possible now, 500), or no answer
// at all (Code "", errors.Is ErrNoWorker).
type WorkerError struct {
	Host    string
	Code    string
	Message string
	Err     error
}

func (e *WorkerError) Error() string {
	if e.Code == "" {
		return fmt.Sprintf("asking the worker on host %s: %v", e.Host, e.Err)
	}
	return fmt.Sprintf("worker on host %s: %s", e.Host, e.Message)
}

func (e *WorkerError) Is(target error) bool {
	return target == ErrNoWorker && e.Code == "" && errors.Is(e.Err, nats.ErrNoResponders)
}
func (e *WorkerError) Unwrap() error { return e.Err }

// allowedError marks a permissions violation.
type allowedError struct{ err error }

func (e *allowedError) Error() string        { return e.err.Error() }
func (e *allowedError) Unwrap() error        { return e.err }
func (e *allowedError) Is(target error) bool { return target == ErrNotAllowed }

// notAllowed marks err when the server refused a permission.
func notAllowed(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, nats.ErrPermissionViolation) || strings.Contains(strings.ToLower(err.Error()), "permissions violation") ||
		errors.Is(err, nats.ErrAuthorization) {
		return &allowedError{err}
	}
	return err
}

// interrupted reports a context the caller ended (not a deadline).
func interrupted(ctx context.Context) bool { return errors.Is(ctx.Err(), context.Canceled) }

package events

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
)

// Purge is a VM's latest purge decision as the event stream holds it.
type Purge struct {
	Seq  uint64    // its stream sequence: the VM's events before it are (or are to be) removed
	Time time.Time // when the server stored it
}

// LastPurge finds the latest purge decision of the VM, if any: its last
// accepted decision when that is a purge (its removal of the events
// before it may be pending), else its first event left when that is a
// purge (the name has a new incarnation since). ok is false when there is
// none.
func LastPurge(ctx context.Context, st jetstream.Stream, n api.Names, vm string) (p Purge, ok bool, err error) {
	isPurge := func(m *jetstream.RawStreamMsg) bool {
		ev, err := DecodeStored(n, m.Subject, m.Data)
		return err == nil && !RelayedCopy(m) && ev.Type == api.TypeAccepted && ev.Action == api.ActPurge
	}
	// A purge whose removal is pending (or was never done: its engine
	// died) is the VM's last accepted decision, until a new incarnation's
	// prepare; once the removal is done it is the VM's first event left.
	m, err := st.GetLastMsgForSubject(ctx, n.Event(vm, api.TypeAccepted, api.EngineWriter))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return Purge{}, false, nil // no decision: never prepared, nothing purged
	case err != nil:
		return Purge{}, false, fmt.Errorf("reading the last decision of vm %s: %w", vm, err)
	case isPurge(m):
		return Purge{Seq: StoredSeq(m), Time: m.Time}, true, nil
	}
	m, err = st.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(n.VMEvents(vm)))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return Purge{}, false, nil
	case err != nil:
		return Purge{}, false, fmt.Errorf("reading the first event of vm %s: %w", vm, err)
	case isPurge(m):
		return Purge{Seq: StoredSeq(m), Time: m.Time}, true, nil
	}
	return Purge{}, false, nil
}

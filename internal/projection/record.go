// Package projection folds the event stream into one VmRecord per VM. The
// fold is pure: the same events give the same records, so dropping the
// VM_RECORDS bucket and rebuilding it from VM_EVENTS gives what was there.
package projection

import (
	"encoding/json"
	"maps"
	"slices"
	"time"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/vm"
)

// InFlight is a command accepted and not yet answered by a result.
type InFlight struct {
	CommandID string     `json:"command_id"`
	Action    fsm.Action `json:"action"`
	Seq       uint64     `json:"seq"` // stream sequence of its accepted event
}

// VmRecord is the projection of one VM's events.
type VmRecord struct {
	Name  string     `json:"name"`
	State vm.VmState `json:"state"`
	// InFlight lists accepted commands without a result, oldest first; the
	// last one is the one the (transitional) state waits for.
	InFlight []InFlight    `json:"in_flight,omitempty"`
	Host     string        `json:"host,omitempty"`
	Backend  vm.BackendTag `json:"backend,omitempty"`
	Handle   *vm.VmHandle  `json:"handle,omitempty"`
	// Vcpus and MemoryMB are what the VM takes on its host (from the
	// accepted prepare's spec); placement counts them.
	Vcpus    int `json:"vcpus,omitempty"`
	MemoryMB int `json:"memory_mb,omitempty"`
	// Image is the image store name the VM was prepared from (spec.image),
	// if it was: a migrate's destination needs it ready.
	Image string `json:"image,omitempty"`
	// Labels are the accepted prepare's spec.labels: the user's metadata,
	// for listing and filtering (never shared, never modified in place).
	Labels map[string]string `json:"labels,omitempty"`
	// CreatedBy is the issuer of the accepted prepare of this incarnation
	// (its command subject's issuer token; "" for a command without one,
	// an admin's or a service's): an operator may purge only the VMs it
	// created.
	CreatedBy string `json:"created_by,omitempty"`
	// Generation counts incarnations: it grows with every accepted prepare.
	Generation    int         `json:"generation"`
	LastSeq       uint64      `json:"last_seq"`
	LastEvent     events.Type `json:"last_event"`
	LastCommandID string      `json:"last_command_id,omitempty"`
	LastError     string      `json:"last_error,omitempty"`
	// Exit is set when the VM's process ended without a command (an
	// `exited` event moved it to stopped) and cleared by its next start or
	// prepare: it tells a crash or an outside kill from a clean stop.
	Exit *Exit `json:"exit,omitempty"`
	// Migration is the migrate in flight (state migrating): where the VM
	// goes, the state it returns to, its last phase.
	Migration *events.Migration `json:"migration,omitempty"`
	CreatedAt time.Time         `json:"created_at,omitzero"`
	UpdatedAt time.Time         `json:"updated_at,omitzero"`
}

// Exit is what an `exited` event said about an incarnation's end.
type Exit struct {
	Time   time.Time `json:"time"`
	Reason string    `json:"reason,omitempty"`
}

// Crashed reports whether the VM is stopped because its process ended
// without a command.
func (r *VmRecord) Crashed() bool { return r != nil && r.Exit != nil && r.State == vm.StateStopped }

// Exists reports whether the VM was ever prepared (a name that only ever
// had rejected commands has no record).
func (r *VmRecord) Exists() bool { return r != nil && r.State != fsm.StateAbsent && r.State != "" }

// CurrentState is the state the FSM decides on.
func (r *VmRecord) CurrentState() vm.VmState {
	if !r.Exists() {
		return fsm.StateAbsent
	}
	return r.State
}

// Clone copies r deeply enough to hand to another goroutine.
func (r *VmRecord) Clone() *VmRecord {
	if r == nil {
		return nil
	}
	c := *r
	c.InFlight = slices.Clone(r.InFlight)
	if r.Exit != nil {
		x := *r.Exit
		c.Exit = &x
	}
	c.Migration = r.Migration.Clone()
	if r.Handle != nil {
		h := r.Handle.Clone()
		c.Handle = &h
	}
	return &c
}

// Fold applies the event at stream sequence seq to rec (nil: no record yet)
// and returns the new record. rec is not modified. Events at or below
// rec.LastSeq were already applied and return rec unchanged, so folding is
// idempotent under redelivery.
func Fold(rec *VmRecord, ev *events.Event, seq uint64) *VmRecord {
	if rec != nil && seq <= rec.LastSeq {
		return rec
	}
	if rec == nil && ev == nil {
		return nil
	}
	var r *VmRecord
	if rec == nil {
		r = &VmRecord{Name: ev.VM, State: fsm.StateAbsent}
	} else {
		r = rec.Clone()
	}
	foldInto(r, ev, seq, false)
	return r
}

// FoldStored folds stored events (in stream order; a nil Event is one
// vmherd did not write, which only moves the sequence on) onto rec, which
// must not be nil (a VM without a record: State absent).
func FoldStored(rec *VmRecord, evs []events.Stored) *VmRecord {
	for _, s := range evs {
		if s.Seq <= rec.LastSeq {
			continue
		}
		if s.Event == nil {
			rec = rec.Clone()
			rec.LastSeq = s.Seq
			continue
		}
		rec = Fold(rec, s.Event, s.Seq)
	}
	return rec
}

// foldInto applies the event at seq (nil: one vmherd did not write) to r in
// place; Fold is foldInto on a copy. With owned, the caller gives ev up,
// and r may keep parts of it (its handle) instead of copies. An event its
// writer may not write about this VM (trusted) moves only last_seq, not
// last_event or updated_at: a worker of another host cannot make a VM
// look touched.
func foldInto(r *VmRecord, ev *events.Event, seq uint64, owned bool) {
	if ev != nil && trusted(r, ev) {
		apply(r, ev, seq, owned)
		r.LastEvent = ev.Type
		r.UpdatedAt = ev.Time
	}
	r.LastSeq = seq
}

func apply(r *VmRecord, ev *events.Event, seq uint64, owned bool) {
	switch ev.Type {
	case events.TypeAccepted:
		if ev.Cancel {
			cancelMigration(r, ev)
			return
		}
		a, err := fsm.ParseAction(string(ev.Action))
		if err != nil {
			return
		}
		if a == fsm.ActPurge {
			// A purge's decision is its outcome: the name is absent
			// again. The record is what a fold of the purge alone gives
			// (the engine removes the VM's earlier events next), so every
			// projector, and a rebuild, folds the same record from here.
			*r = VmRecord{Name: r.Name, State: fsm.StateAbsent}
			return
		}
		decide := func(cur vm.VmState) (vm.VmState, error) { return fsm.Decide(cur, a) }
		if ev.Forget && a == fsm.ActDestroy {
			decide = fsm.Forget
		}
		next, err := decide(r.CurrentState())
		if err != nil {
			// An accepted event the table forbids cannot come from a
			// correct engine; the fold keeps the state it had.
			return
		}
		if ev.Forget {
			// The commands in flight on the lost host are abandoned (each
			// gets a failed result that now answers nothing).
			r.InFlight = nil
		}
		if a == fsm.ActPrepare {
			r.Handle = nil
			r.InFlight = nil
			r.Generation++
			r.CreatedAt = ev.Time
			r.CreatedBy = ev.Issuer
			r.LastError = ""
			r.Backend = ev.Backend
			r.Vcpus, r.MemoryMB, r.Image, r.Labels = 0, 0, "", nil
			if ev.Spec != nil {
				r.Vcpus, r.MemoryMB, r.Image = ev.Spec.Vcpus, ev.Spec.MemoryMB, ev.Spec.Image
				if len(ev.Spec.Labels) > 0 {
					r.Labels = maps.Clone(ev.Spec.Labels)
				}
			}
		}
		if a == fsm.ActPrepare || a == fsm.ActStart || a == fsm.ActDestroy {
			r.Exit = nil
		}
		if ev.Host != "" {
			r.Host = ev.Host
		}
		r.Migration = nil
		if a == fsm.ActMigrate && ev.Migration != nil {
			m := ev.Migration.Clone()
			m.Role, m.Phase, m.Endpoint = "", "", ""
			r.Migration = m
		}
		r.State = next
		r.InFlight = append(r.InFlight, InFlight{CommandID: ev.CommandID, Action: ev.Action, Seq: seq})
		r.LastCommandID = ev.CommandID
	case events.TypeRejected:
		// State unchanged.
	case events.TypeMigration:
		m := r.Migration
		if m == nil || ev.Migration == nil || len(r.InFlight) == 0 || r.InFlight[len(r.InFlight)-1].CommandID != ev.CommandID {
			return // news of a migrate no longer in flight
		}
		m.Phase = ev.Migration.Phase
		m.Bytes, m.Total = ev.Migration.Bytes, ev.Migration.Total
	case events.TypeExited:
		if r.Handle == nil || ev.Handle == nil || ev.Handle.ID != r.Handle.ID || ev.Handle.PID != r.Handle.PID {
			return // a stale observation of another incarnation
		}
		if next, ok := fsm.Apply(r.CurrentState(), fsm.ResExited); ok {
			r.State = next
			h := r.Handle.Clone()
			h.PID = 0
			r.Handle = &h
			r.LastError = "exited: " + ev.Reason
			r.Exit = &Exit{Time: ev.Time, Reason: ev.Reason}
		}
	default:
		if !ev.Type.IsResult() {
			return
		}
		i := slices.IndexFunc(r.InFlight, func(f InFlight) bool { return f.CommandID == ev.CommandID })
		if i < 0 {
			return // answers nothing in flight (an older incarnation's command)
		}
		current := i == len(r.InFlight)-1
		r.InFlight = slices.Delete(r.InFlight, i, i+1)
		if len(r.InFlight) == 0 {
			r.InFlight = nil
		}
		switch {
		case ev.Handle == nil:
		case owned:
			r.Handle = ev.Handle
		default:
			h := ev.Handle.Clone()
			r.Handle = &h
		}
		if ev.Type == events.TypeFailed {
			r.LastError = ev.Error
		}
		if current {
			before := vm.VmState("")
			if r.Migration != nil {
				before = r.Migration.Before
			}
			if next, ok := fsm.Settle(r.CurrentState(), before, fsm.Result(ev.Type)); ok {
				if ev.Type == events.TypeMigrated && ev.Migration != nil {
					// The switch: the VM is its destination's now.
					r.Host = ev.Migration.To
				}
				if r.State == vm.StateMigrating {
					r.Migration = nil
				}
				r.State = next
				if ev.Type != events.TypeFailed {
					r.LastError = ev.Reason // set when a forgotten VM's destroyed says why
				}
			}
		}
	}
}

// cancelMigration folds an accepted cancel: the migrate it abandons
// ends (its failed result, stored next by the engine, answers nothing
// more) and the VM is back in the state it had, on its host.
func cancelMigration(r *VmRecord, ev *events.Event) {
	if r.State != vm.StateMigrating || r.Migration == nil {
		return
	}
	for _, a := range ev.Abandoned {
		r.InFlight = slices.DeleteFunc(r.InFlight, func(f InFlight) bool { return f.CommandID == a.CommandID })
	}
	if len(r.InFlight) == 0 {
		r.InFlight = nil
	}
	r.State = r.Migration.Before
	r.Migration = nil
	r.LastCommandID = ev.CommandID
}

// trusted reports whether the event's writer (the last token of its
// subject, authenticated by NATS permissions) may move the VM: decisions
// only from an engine; results and observations from an engine or the
// worker of the VM's host. A worker of another host may publish on its own
// writer token for any VM name, and such an event is stored but changes
// nothing. An event without a writer (folded by a caller that had no
// subject, as unit tests do) is trusted.
func trusted(r *VmRecord, ev *events.Event) bool {
	if ev.Writer == "" || ev.FromEngine() {
		return true
	}
	if ev.Type == events.TypeAccepted || ev.Type == events.TypeRejected {
		return false
	}
	if ev.Type == events.TypeMigration && r.Migration != nil && ev.Writer == r.Migration.To {
		return true // the target's phases
	}
	return ev.Writer == r.Host
}

// Marshal renders a record for the KV bucket.
func (r *VmRecord) Marshal() []byte {
	b, err := json.Marshal(r)
	if err != nil {
		panic(err) // plain data
	}
	return b
}

// Unmarshal parses a record from the KV bucket.
func Unmarshal(b []byte) (*VmRecord, error) {
	var r VmRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

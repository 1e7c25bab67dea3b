// Package projection folds the event stream into one api.VmRecord per VM. The
// fold is pure: the same events give the same records, so dropping the
// VM_RECORDS bucket and rebuilding it from VM_EVENTS gives what was there.
package projection

import (
	"maps"
	"slices"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
)

// Fold applies the event at stream sequence seq to rec (nil: no record yet)
// and returns the new record. rec is not modified. Events at or below
// rec.LastSeq were already applied and return rec unchanged, so folding is
// idempotent under redelivery.
func Fold(rec *api.VmRecord, ev *api.Event, seq uint64) *api.VmRecord {
	if rec != nil && seq <= rec.LastSeq {
		return rec
	}
	if rec == nil && ev == nil {
		return nil
	}
	var r *api.VmRecord
	if rec == nil {
		r = &api.VmRecord{Name: ev.VM, State: fsm.StateAbsent}
	} else {
		r = rec.Clone()
	}
	foldInto(r, ev, seq, false)
	return r
}

// FoldStored folds stored events (in stream order; a nil Event is one
// vmherd did not write, which only moves the sequence on) onto rec, which
// must not be nil (a VM without a record: State absent).
func FoldStored(rec *api.VmRecord, evs []events.Stored) *api.VmRecord {
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
// writer may not write about this VM (VmRecord.Trusts) moves only last_seq, not
// last_event or updated_at: a worker of another host cannot make a VM
// look touched.
func foldInto(r *api.VmRecord, ev *api.Event, seq uint64, owned bool) {
	if ev != nil && r.Trusts(ev) {
		apply(r, ev, seq, owned)
		r.LastEvent = ev.Type
		r.UpdatedAt = ev.Time
	}
	r.LastSeq = seq
}

func apply(r *api.VmRecord, ev *api.Event, seq uint64, owned bool) {
	switch ev.Type {
	case api.TypeAccepted:
		if ev.Cancel {
			cancelMigration(r, ev)
			return
		}
		a, err := api.ParseAction(string(ev.Action))
		if err != nil {
			return
		}
		if a == fsm.ActPurge {
			// A purge's decision is its outcome: the name is absent
			// again. The record is what a fold of the purge alone gives
			// (the engine removes the VM's earlier events next), so every
			// projector, and a rebuild, folds the same record from here.
			*r = api.VmRecord{Name: r.Name, State: fsm.StateAbsent}
			return
		}
		decide := func(cur api.VmState) (api.VmState, error) { return fsm.Decide(cur, a) }
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
		r.InFlight = append(r.InFlight, api.InFlight{CommandID: ev.CommandID, Action: ev.Action, Seq: seq})
		r.LastCommandID = ev.CommandID
	case api.TypeRejected:
		// State unchanged.
	case api.TypeMigration:
		m := r.Migration
		if m == nil || ev.Migration == nil || len(r.InFlight) == 0 || r.InFlight[len(r.InFlight)-1].CommandID != ev.CommandID {
			return // news of a migrate no longer in flight
		}
		m.Phase = ev.Migration.Phase
		m.Bytes, m.Total = ev.Migration.Bytes, ev.Migration.Total
	case api.TypeExited:
		if r.Handle == nil || ev.Handle == nil || ev.Handle.ID != r.Handle.ID || ev.Handle.PID != r.Handle.PID {
			return // a stale observation of another incarnation
		}
		if next, ok := fsm.Apply(r.CurrentState(), fsm.ResExited); ok {
			r.State = next
			h := r.Handle.Clone()
			h.PID = 0
			r.Handle = &h
			r.LastError = "exited: " + ev.Reason
			r.Exit = &api.Exit{Time: ev.Time, Reason: ev.Reason}
		}
	default:
		if !ev.Type.IsResult() {
			return
		}
		i := slices.IndexFunc(r.InFlight, func(f api.InFlight) bool { return f.CommandID == ev.CommandID })
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
		if ev.Type == api.TypeFailed {
			r.LastError = ev.Error
		}
		if current {
			before := api.VmState("")
			if r.Migration != nil {
				before = r.Migration.Before
			}
			if next, ok := fsm.Settle(r.CurrentState(), before, fsm.Result(ev.Type)); ok {
				if ev.Type == api.TypeMigrated && ev.Migration != nil {
					// The switch: the VM is its destination's now.
					r.Host = ev.Migration.To
				}
				if r.State == api.StateMigrating {
					r.Migration = nil
				}
				r.State = next
				if ev.Type != api.TypeFailed {
					r.LastError = ev.Reason // set when a forgotten VM's destroyed says why
				}
			}
		}
	}
}

// cancelMigration folds an accepted cancel: the migrate it abandons
// ends (its failed result, stored next by the engine, answers nothing
// more) and the VM is back in the state it had, on its host.
func cancelMigration(r *api.VmRecord, ev *api.Event) {
	if r.State != api.StateMigrating || r.Migration == nil {
		return
	}
	for _, a := range ev.Abandoned {
		r.InFlight = slices.DeleteFunc(r.InFlight, func(f api.InFlight) bool { return f.CommandID == a.CommandID })
	}
	if len(r.InFlight) == 0 {
		r.InFlight = nil
	}
	r.State = r.Migration.Before
	r.Migration = nil
	r.LastCommandID = ev.CommandID
}

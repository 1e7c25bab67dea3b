package api

import (
	"encoding/json"
	"slices"
	"time"

	"github.com/vmherd/vmherd/internal/fsm"
)

// InFlight is a command accepted and not yet answered by a result.
type InFlight struct {
	CommandID string `json:"command_id"`
	Action    Action `json:"action"`
	Seq       uint64 `json:"seq"` // stream sequence of its accepted event
}

// VmRecord is the projection of one VM's events.
type VmRecord struct {
	Name  string  `json:"name"`
	State VmState `json:"state"`
	// InFlight lists accepted commands without a result, oldest first; the
	// last one is the one the (transitional) state waits for.
	InFlight []InFlight `json:"in_flight,omitempty"`
	Host     string     `json:"host,omitempty"`
	Backend  BackendTag `json:"backend,omitempty"`
	Handle   *VmHandle  `json:"handle,omitempty"`
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
	// Generation counts incarnations: it grows with every accepted prepare
	// (a purge starts it again: the name is new).
	Generation    int       `json:"generation"`
	LastSeq       uint64    `json:"last_seq"`
	LastEvent     EventType `json:"last_event"`
	LastCommandID string    `json:"last_command_id,omitempty"`
	LastError     string    `json:"last_error,omitempty"`
	// Exit is set when the VM's process ended without a command (an
	// `exited` event moved it to stopped) and cleared by its next start or
	// prepare: it tells a crash or an outside kill from a clean stop.
	Exit *Exit `json:"exit,omitempty"`
	// Migration is the migrate in flight (state migrating): where the VM
	// goes, the state it returns to, its last phase.
	Migration *Migration `json:"migration,omitempty"`
	CreatedAt time.Time  `json:"created_at,omitzero"`
	UpdatedAt time.Time  `json:"updated_at,omitzero"`
}

// Exit is what an `exited` event said about an incarnation's end.
type Exit struct {
	Time   time.Time `json:"time"`
	Reason string    `json:"reason,omitempty"`
}

// Crashed reports whether the VM is stopped because its process ended
// without a command.
func (r *VmRecord) Crashed() bool { return r != nil && r.Exit != nil && r.State == StateStopped }

// Exists reports whether the VM was ever prepared (a name that only ever
// had rejected commands has no record).
func (r *VmRecord) Exists() bool { return r != nil && r.State != fsm.StateAbsent && r.State != "" }

// CurrentState is the state the FSM decides on.
func (r *VmRecord) CurrentState() VmState {
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

// UnmarshalRecord parses a record as VM_RECORDS stores it.
func UnmarshalRecord(b []byte) (*VmRecord, error) {
	var r VmRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Marshal renders a record for the KV bucket.
func (r *VmRecord) Marshal() []byte {
	b, err := json.Marshal(r)
	if err != nil {
		panic(err) // plain data
	}
	return b
}

// Trusts reports whether the event's writer (the last token of its
// subject, authenticated by NATS permissions) may move the VM: decisions
// only from an engine; results and observations from an engine or the
// worker of the VM's host. A worker of another host may publish on its own
// writer token for any VM name, and such an event is stored but changes
// nothing. An event without a writer (folded by a caller that had no
// subject, as unit tests do) is trusted.
func (r *VmRecord) Trusts(ev *Event) bool {
	if ev.Writer == "" || ev.FromEngine() {
		return true
	}
	if ev.Type == TypeAccepted || ev.Type == TypeRejected {
		return false
	}
	if ev.Type == TypeMigration && r.Migration != nil && ev.Writer == r.Migration.To {
		return true // the target's phases
	}
	return ev.Writer == r.Host
}

// Live reports whether the record holds a VM: prepared once and not
// destroyed since (in any state, transitional or failed included). A
// destroyed record stays in VM_RECORDS until purged; a name without a
// record is not live either.
func (r *VmRecord) Live() bool { return r.Exists() && r.State != StateDestroyed }

// Destroyed reports whether the record's VM was destroyed.
func (r *VmRecord) Destroyed() bool { return r.Exists() && r.State == StateDestroyed }

// Allows reports whether an engine would accept action now, by asking the
// state machine with the record's state (StateAbsent for a nil record):
// nil, or the rejection the engine would give, naming the states the
// action is accepted from. An engine decides on its own, newer, view: a
// nil here is no promise.
func (r *VmRecord) Allows(action Action) error {
	_, err := fsm.Decide(r.CurrentState(), action)
	return err
}

// InFlightCommand is the command the record's transitional state waits
// for, or nil.
func (r *VmRecord) InFlightCommand() *InFlight {
	if r == nil || len(r.InFlight) == 0 {
		return nil
	}
	return &r.InFlight[len(r.InFlight)-1]
}

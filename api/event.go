package api

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/vmherd/vmherd/internal/fsm"
)

// EventType is an event type, the token after the VM in its subject.
type EventType string

// The decisions are the engine's; every other type is a result of the
// state machine (fsm.Results), which defines them.
const (
	TypeAccepted  EventType = "accepted"
	TypeRejected  EventType = "rejected"
	TypePrepared            = EventType(fsm.ResPrepared)
	TypeStarted             = EventType(fsm.ResStarted)
	TypeStopped             = EventType(fsm.ResStopped)
	TypeSuspended           = EventType(fsm.ResSuspended)
	TypeResumed             = EventType(fsm.ResResumed)
	TypeDestroyed           = EventType(fsm.ResDestroyed)
	TypeFailed              = EventType(fsm.ResFailed)
	TypeExited              = EventType(fsm.ResExited)
	TypeMigrated            = EventType(fsm.ResMigrated)
	// TypeFenced is a worker's observation: it removed from its host a VM
	// that was forgotten while the host was lost (destroy with forget).
	TypeFenced EventType = "fenced"
	// TypeMigration reports a phase of a migrate in flight (a worker's,
	// of the source or the target host); it ends nothing.
	TypeMigration EventType = "migration"
)

// EventTypes lists every event type: the two decisions, the results, then the
// worker's fencing report.
var EventTypes = func() []EventType {
	ts := []EventType{TypeAccepted, TypeRejected}
	for _, r := range fsm.Results {
		ts = append(ts, EventType(r))
	}
	return append(ts, TypeFenced, TypeMigration)
}()

// IsResult reports whether t ends a command (every accepted command ends in
// exactly one of these).
func (t EventType) IsResult() bool { return fsm.Result(t).IsOutcome() }

// ResultOf is the success result of an action.
func ResultOf(a Action) EventType { return EventType(a.Success()) }

// Command is the body of a message on vm.cmd.<vm>.<action>.
type Command struct {
	CommandID string  `json:"command_id,omitempty"`
	Spec      *VmSpec `json:"spec,omitempty"`
	TimeoutS  int     `json:"timeout_s,omitempty"`
	Host      string  `json:"host,omitempty"`
	// Forget (destroy only): the VM's host is lost for good; end the VM's
	// record without its worker, and fence the VM if the host comes back.
	Forget bool `json:"forget,omitempty"`
	// Cancel (migrate only): end the migration in flight; the VM stays
	// where it was. Host, on a migrate, is the destination (empty: placed).
	Cancel bool `json:"cancel,omitempty"`
}

// Event is the envelope of a message on vm.evt.<vm>.<type>.
type Event struct {
	Type      EventType `json:"type"`
	VM        string    `json:"vm"`
	CommandID string    `json:"command_id,omitempty"`
	Action    Action    `json:"action,omitempty"`
	// Issuer, on a decision, is the identity that sent the command (the
	// issuer token of its subject); empty for a command without one.
	Issuer string    `json:"issuer,omitempty"`
	Time   time.Time `json:"time"`
	Host   string    `json:"host,omitempty"`
	State  VmState   `json:"state,omitempty"`
	Handle *VmHandle `json:"handle,omitempty"`
	Reason string    `json:"reason,omitempty"`
	Error  string    `json:"error,omitempty"`

	// Accepted events carry what the worker needs to run the command, so a
	// task can always be derived again from the event alone.
	Backend  BackendTag `json:"backend,omitempty"`
	Spec     *VmSpec    `json:"spec,omitempty"`
	TimeoutS int        `json:"timeout_s,omitempty"`

	// AcceptedSeq is, on a result, the stream sequence of the accepted
	// event it answers.
	AcceptedSeq uint64 `json:"accepted_seq,omitempty"`

	// Forget marks an accepted destroy that forgets a VM on a lost host:
	// the engines store its result, and a fencing task waits for the host.
	// Abandoned lists the commands that were in flight on the lost host;
	// each gets a failed result.
	Forget    bool        `json:"forget,omitempty"`
	Abandoned []Abandoned `json:"abandoned,omitempty"`

	// Migration: on a migrate's accepted event, its results and its
	// migration events, where the VM goes and how far it got. Cancel
	// marks an accepted cancel of the migrate in Abandoned.
	Migration *Migration `json:"migration,omitempty"`
	Cancel    bool       `json:"cancel,omitempty"`

	// Writer is not in the body: it is the last token of the event's
	// subject (EngineWriter, or the writing worker's host), set by the
	// readers that have the subject (DecodeStored). The fold trusts a
	// worker's result only from the VM's host.
	Writer string `json:"-"`
}

// InvalidVM is the subject token of the rejections of commands whose VM
// name is not valid; the event's vm field holds the raw name.
const InvalidVM = "_invalid"

// FromEngine reports whether an engine wrote the event.
func (ev *Event) FromEngine() bool { return ev.Writer == EngineWriter }

// Abandoned is a command in flight on a lost host when its VM was
// forgotten: it gets a failed result from the engines instead of its
// worker.
type Abandoned struct {
	CommandID string `json:"command_id"`
	Action    Action `json:"action"`
	Seq       uint64 `json:"seq"` // stream sequence of its accepted event
}

// Migration modes.
const (
	MigrateLive = "live" // running or suspended: disk and memory, the guest keeps its state
	MigrateCold = "cold" // prepared or stopped: the disk
)

// Migration roles: which side of a migrate a task is for.
const (
	RoleSource = "source"
	RoleTarget = "target"
)

// Migration phases, in the order they happen (the phase of a migration
// event).
const (
	PhaseSourceReady = "source_ready" // cold: the source exports the disk (Endpoint)
	PhaseTargetReady = "target_ready" // the target's copy waits (Endpoint: where to send, live)
	PhaseCopying     = "copying"      // the source sends: Bytes of Total so far
	PhaseSwitchover  = "switchover"   // the guest is paused on the source, the last of it copied
)

// Migration says where a migrating VM goes and how far it got.
type Migration struct {
	From   string  `json:"from"`
	To     string  `json:"to"`
	Mode   string  `json:"mode"`
	Before VmState `json:"before"` // the state it returns to
	// Role, on a task: which side this host is.
	Role string `json:"role,omitempty"`
	// Phase, Endpoint, Digest: a migration event's news. Endpoint is
	// where the next side connects (NBD export, QEMU's incoming
	// migration); Digest the base image's sha256 on the host that wrote it.
	Phase    string `json:"phase,omitempty"`
	Endpoint string `json:"endpoint,omitempty"`
	Digest   string `json:"digest,omitempty"`
	// DiskDigest (source_ready, cold): the sha256 of the exported disk layer.
	DiskDigest string `json:"disk_digest,omitempty"`
	// Bytes copied of Total, so far or in all; DowntimeMS the guest's
	// pause at the switch (migrated, live); CancelledBy the command that
	// cancelled it (its failed result).
	Bytes       int64  `json:"bytes,omitempty"`
	Total       int64  `json:"total,omitempty"`
	DowntimeMS  int64  `json:"downtime_ms,omitempty"`
	CancelledBy string `json:"cancelled_by,omitempty"`
}

// Clone copies m.
func (m *Migration) Clone() *Migration {
	if m == nil {
		return nil
	}
	c := *m
	return &c
}

// Encode renders an event body.
func (ev *Event) Encode() []byte {
	b, err := json.Marshal(ev)
	if err != nil {
		panic(fmt.Sprintf("encoding event: %v", err)) // only plain data: cannot fail
	}
	return b
}

// Message ids. JetStream deduplicates a Nats-Msg-Id across the whole
// stream (every VM), while command ids are chosen by users and need only
// be unique per VM: so every id includes the VM name.
//
// CommandMsgID is a command's Nats-Msg-Id in VM_COMMANDS, as vmctl sends
// it: <vm>/<command id>.
func CommandMsgID(vmName, commandID string) string { return vmName + "/" + commandID }

// DecisionMsgID is an engine's decision (accepted or rejected) of a command.
func DecisionMsgID(vmName, commandID string) string { return vmName + "/" + commandID + "/decision" }

// TaskMsgID is the task an accepted command queues.
func TaskMsgID(vmName, commandID string) string { return vmName + "/" + commandID + "/task" }

// ResultMsgID is the result that ends an accepted command.
func ResultMsgID(vmName, commandID string) string { return vmName + "/" + commandID + "/result" }

// FencedMsgID names the fencing report of a forget command.
func FencedMsgID(vmName, commandID string) string { return vmName + "/" + commandID + "/fenced" }

// MigrationMsgID is the message id of a migration event: one per phase
// of a command on a host's incarnation (attempt: the handle id).
func MigrationMsgID(vmName, commandID, phase, attempt string) string {
	return vmName + "/" + commandID + "/" + phase + "/" + attempt
}

// ExitMsgID names an exited observation by the incarnation it saw.
func ExitMsgID(vmName, handleID string, pid int) string {
	return fmt.Sprintf("%s/%s/%d/exited", vmName, handleID, pid)
}

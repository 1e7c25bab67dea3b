// Package events holds vmherd's wire contract: command and event envelopes,
// subjects, the streams and buckets with their settings, and the append
// with per-VM optimistic concurrency.
package events

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/vm"
)

// Type is an event type, the token after the VM in its subject.
type Type string

// The decisions are the engine's; every other type is a result of the
// state machine (fsm.Results), which defines them.
const (
	TypeAccepted  Type = "accepted"
	TypeRejected  Type = "rejected"
	TypePrepared       = Type(fsm.ResPrepared)
	TypeStarted        = Type(fsm.ResStarted)
	TypeStopped        = Type(fsm.ResStopped)
	TypeSuspended      = Type(fsm.ResSuspended)
	TypeResumed        = Type(fsm.ResResumed)
	TypeDestroyed      = Type(fsm.ResDestroyed)
	TypeFailed         = Type(fsm.ResFailed)
	TypeExited         = Type(fsm.ResExited)
	TypeMigrated       = Type(fsm.ResMigrated)
	// TypeFenced is a worker's observation: it removed from its host a VM
	// that was forgotten while the host was lost (destroy with forget).
	TypeFenced Type = "fenced"
	// TypeMigration reports a phase of a migrate in flight (a worker's,
	// of the source or the target host); it ends nothing.
	TypeMigration Type = "migration"
)

// Types lists every event type: the two decisions, the results, then the
// worker's fencing report.
var Types = func() []Type {
	ts := []Type{TypeAccepted, TypeRejected}
	for _, r := range fsm.Results {
		ts = append(ts, Type(r))
	}
	return append(ts, TypeFenced, TypeMigration)
}()

// IsResult reports whether t ends a command (every accepted command ends in
// exactly one of these).
func (t Type) IsResult() bool { return fsm.Result(t).IsOutcome() }

// ResultOf is the success result of an action.
func ResultOf(a fsm.Action) Type { return Type(a.Success()) }

// Command is the body of a message on vm.cmd.<vm>.<action>.
type Command struct {
	CommandID string     `json:"command_id,omitempty"`
	Spec      *vm.VmSpec `json:"spec,omitempty"`
	TimeoutS  int        `json:"timeout_s,omitempty"`
	Host      string     `json:"host,omitempty"`
	// Forget (destroy only): the VM's host is lost for good; end the VM's
	// record without its worker, and fence the VM if the host comes back.
	Forget bool `json:"forget,omitempty"`
	// Cancel (migrate only): end the migration in flight; the VM stays
	// where it was. Host, on a migrate, is the destination (empty: placed).
	Cancel bool `json:"cancel,omitempty"`
}

// Event is the envelope of a message on vm.evt.<vm>.<type>.
type Event struct {
	Type      Type       `json:"type"`
	VM        string     `json:"vm"`
	CommandID string     `json:"command_id,omitempty"`
	Action    fsm.Action `json:"action,omitempty"`
	// Issuer, on a decision, is the identity that sent the command (the
	// issuer token of its subject); empty for a command without one.
	Issuer string       `json:"issuer,omitempty"`
	Time   time.Time    `json:"time"`
	Host   string       `json:"host,omitempty"`
	State  vm.VmState   `json:"state,omitempty"`
	Handle *vm.VmHandle `json:"handle,omitempty"`
	Reason string       `json:"reason,omitempty"`
	Error  string       `json:"error,omitempty"`

	// Accepted events carry what the worker needs to run the command, so a
	// task can always be derived again from the event alone.
	Backend  vm.BackendTag `json:"backend,omitempty"`
	Spec     *vm.VmSpec    `json:"spec,omitempty"`
	TimeoutS int           `json:"timeout_s,omitempty"`

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

// DecodeStored parses an event stored on subj, with its writer from the
// subject. An event whose subject is not vm.evt.<vm>.<type>.<writer>, or
// whose body names another VM or type, is an error.
func (n Names) DecodeStored(subj string, data []byte) (*Event, error) {
	name, t, writer, ok := n.ParseEventSubject(subj)
	if !ok {
		return nil, fmt.Errorf("decoding event: subject %q is not %s", subj, n.Event("<vm>", "<type>", "<writer>"))
	}
	ev, err := Decode(data)
	if err != nil {
		return nil, err
	}
	if ev.VM != name && name != InvalidVM || ev.Type != t {
		return nil, fmt.Errorf("decoding event: the body (vm %q, type %q) does not match the subject %q", ev.VM, ev.Type, subj)
	}
	ev.Writer = writer
	return ev, nil
}

// StoredByServer reports whether a stored message was put there by the
// NATS server on a client's behalf rather than written by a client: the
// answer of a direct get whose reply subject was the stream's subject
// (it carries the Nats-Stream and Nats-Sequence headers of the answer;
// no vmherd writer sets them). Anyone who may direct-get can have the
// server store any message they can read, and so one whose body they
// wrote, on a subject they may not publish to (vm.evt.<vm>.<type>._engine):
// readers that take the writer from the subject must skip it. Read with a
// consumer, the message shows those headers; read with a direct get, the
// client library reports the first Nats-Subject, the original one.
func StoredByServer(h nats.Header) bool {
	return h.Get("Nats-Stream") != "" || h.Get("Nats-Sequence") != ""
}

// Abandoned is a command in flight on a lost host when its VM was
// forgotten: it gets a failed result from the engines instead of its
// worker.
type Abandoned struct {
	CommandID string     `json:"command_id"`
	Action    fsm.Action `json:"action"`
	Seq       uint64     `json:"seq"` // stream sequence of its accepted event
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
	From   string     `json:"from"`
	To     string     `json:"to"`
	Mode   string     `json:"mode"`
	Before vm.VmState `json:"before"` // the state it returns to
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

// Task is the body of a message on vm.task.<host>.<vm>: one backend call.
type Task struct {
	CommandID   string        `json:"command_id"`
	VM          string        `json:"vm"`
	Action      fsm.Action    `json:"action"`
	Host        string        `json:"host"`
	Backend     vm.BackendTag `json:"backend,omitempty"`
	Spec        *vm.VmSpec    `json:"spec,omitempty"`
	Handle      *vm.VmHandle  `json:"handle,omitempty"`
	TimeoutS    int           `json:"timeout_s,omitempty"`
	AcceptedSeq uint64        `json:"accepted_seq"`
	// Fence: remove this (forgotten) VM from the host and report `fenced`;
	// the command's result is already stored.
	Fence bool `json:"fence,omitempty"`
	// Migration: a migrate's side for this host (Role).
	Migration *Migration `json:"migration,omitempty"`
}

// TaskFromAccepted derives a task from an accepted event and its sequence.
func TaskFromAccepted(ev *Event, seq uint64) Task {
	return Task{
		CommandID: ev.CommandID, VM: ev.VM, Action: ev.Action, Host: ev.Host,
		Backend: ev.Backend, Spec: ev.Spec, Handle: ev.Handle, TimeoutS: ev.TimeoutS,
		AcceptedSeq: seq, Fence: ev.Forget,
	}
}

// QueuedTask is a task with the host whose queue it goes to and its
// message id.
type QueuedTask struct {
	Task  Task
	MsgID string
}

// TasksOf lists the tasks an accepted event queues: one for the VM's
// host, and for a migrate one more for its destination (a cancel queues
// none: its engine stores the outcome).
func TasksOf(ev *Event, seq uint64) []QueuedTask {
	if ev.Type != TypeAccepted || ev.Cancel || ev.Action == fsm.ActPurge {
		return nil // a purge is done by the engines (no worker takes part)
	}
	t := TaskFromAccepted(ev, seq)
	if ev.Action != fsm.ActMigrate || ev.Migration == nil {
		return []QueuedTask{{Task: t, MsgID: TaskMsgID(ev.VM, ev.CommandID)}}
	}
	src, dst := t, t
	src.Migration, dst.Migration = ev.Migration.Clone(), ev.Migration.Clone()
	src.Migration.Role, dst.Migration.Role = RoleSource, RoleTarget
	dst.Host = ev.Migration.To
	return []QueuedTask{
		{Task: src, MsgID: TaskMsgID(ev.VM, ev.CommandID)},
		{Task: dst, MsgID: TaskMsgID(ev.VM, ev.CommandID) + "/" + RoleTarget},
	}
}

// Decode parses an event body.
func Decode(data []byte) (*Event, error) {
	var ev *Event
	ok := false
	if !stdlibOnly.Load() {
		ev, ok = decodeFast(data)
	}
	if !ok {
		ev = &Event{}
		if err := json.Unmarshal(data, ev); err != nil {
			return nil, fmt.Errorf("decoding event: %w", err)
		}
	}
	if ev.Type == "" || ev.VM == "" {
		return nil, errors.New("decoding event: missing type or vm")
	}
	return ev, nil
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

func DecisionMsgID(vmName, commandID string) string { return vmName + "/" + commandID + "/decision" }
func TaskMsgID(vmName, commandID string) string     { return vmName + "/" + commandID + "/task" }
func ResultMsgID(vmName, commandID string) string   { return vmName + "/" + commandID + "/result" }

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

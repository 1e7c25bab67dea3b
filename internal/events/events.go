// Package events is vmherd's event store: the only writer of the
// VM_EVENTS stream (Store.Append with per-VM optimistic concurrency, and
// AppendAsync, AppendInvalid, AppendHost for what moves no record), its
// readers by direct gets (ReadVM, FollowVM, ReadStream, and KVEntries and
// KVPoll for the buckets: no consumer is left behind), decoding with the
// writer taken from the subject (Decode, DecodeStored), and the task
// envelope the engines queue on VM_TASKS (Task, TasksOf). The wire types
// are package api's; the streams, buckets and their set-up are package
// jsetup's.
package events

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/fsm"
)

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

// Task is the body of a message on vm.task.<host>.<vm>: one backend call.
type Task struct {
	CommandID   string         `json:"command_id"`
	VM          string         `json:"vm"`
	Action      fsm.Action     `json:"action"`
	Host        string         `json:"host"`
	Backend     api.BackendTag `json:"backend,omitempty"`
	Spec        *api.VmSpec    `json:"spec,omitempty"`
	Handle      *api.VmHandle  `json:"handle,omitempty"`
	TimeoutS    int            `json:"timeout_s,omitempty"`
	AcceptedSeq uint64         `json:"accepted_seq"`
	// Fence: remove this (forgotten) VM from the host and report `fenced`;
	// the command's result is already stored.
	Fence bool `json:"fence,omitempty"`
	// Migration: a migrate's side for this host (Role).
	Migration *api.Migration `json:"migration,omitempty"`
}

// TaskFromAccepted derives a task from an accepted event and its sequence.
func TaskFromAccepted(ev *api.Event, seq uint64) Task {
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
func TasksOf(ev *api.Event, seq uint64) []QueuedTask {
	if ev.Type != api.TypeAccepted || ev.Cancel || ev.Action == fsm.ActPurge {
		return nil // a purge is done by the engines (no worker takes part)
	}
	t := TaskFromAccepted(ev, seq)
	if ev.Action != fsm.ActMigrate || ev.Migration == nil {
		return []QueuedTask{{Task: t, MsgID: api.TaskMsgID(ev.VM, ev.CommandID)}}
	}
	src, dst := t, t
	src.Migration, dst.Migration = ev.Migration.Clone(), ev.Migration.Clone()
	src.Migration.Role, dst.Migration.Role = api.RoleSource, api.RoleTarget
	dst.Host = ev.Migration.To
	return []QueuedTask{
		{Task: src, MsgID: api.TaskMsgID(ev.VM, ev.CommandID)},
		{Task: dst, MsgID: api.TaskMsgID(ev.VM, ev.CommandID) + "/" + api.RoleTarget},
	}
}

// Decode parses an event body.
func Decode(data []byte) (*api.Event, error) {
	var ev *api.Event
	ok := false
	if !stdlibOnly.Load() {
		ev, ok = decodeFast(data)
	}
	if !ok {
		ev = &api.Event{}
		if err := json.Unmarshal(data, ev); err != nil {
			return nil, fmt.Errorf("decoding event: %w", err)
		}
	}
	if ev.Type == "" || ev.VM == "" {
		return nil, errors.New("decoding event: missing type or vm")
	}
	return ev, nil
}

// Package api holds vmherd's wire contract as Go types: what a client
// publishes, what it reads back, and the subjects, streams and buckets
// they travel on. docs/contract.md describes the same contract for any
// language, and schemas/ holds its JSON Schemas; a test keeps the three
// in step.
//
// # Commands
//
// A lifecycle command is a [Command] published with JetStream to
// [Names.IssuedCommand] (vm.cmd.<vm>.<action>.<issuer>) with the message id
// [CommandMsgID]: the id makes a retried publish a duplicate the server
// drops, so sending is safe to repeat. The [Action]s are prepare (with a
// [VmSpec]), start, stop, suspend, resume, destroy and migrate.
//
// # Events
//
// An engine decides each command and stores one [Event] of type
// [TypeAccepted] or [TypeRejected] on vm.evt.<vm>.<type>.<writer>; an
// accepted command then ends in exactly one result ([EventType.IsResult]),
// written by the worker of the VM's host or by an engine. The last token of
// the subject, the writer, is authenticated by the server's permissions:
// [VmRecord.Trusts] says which writers may move a VM.
//
// # Records
//
// The engines fold every VM's events into a [VmRecord] in the VM_RECORDS
// bucket: its [VmState], host, handle and the commands in flight. Its
// methods answer what a caller usually asks ([VmRecord.Exists],
// [VmRecord.Live], [VmRecord.Allows]) by asking the state machine.
//
// Package github.com/vmherd/vmherd/client sends commands, waits for their
// results and reads all of this for a Go program.
package api

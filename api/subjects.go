package api

import (
	"fmt"
	"strconv"
	"strings"
)

// DefaultPrefix is the first token of every subject.
const DefaultPrefix = "vm"

// Names derives every subject, stream and bucket name from a prefix, so two
// vmherd installations can share one NATS account.
type Names struct {
	Prefix string
}

// DefaultNames uses the prefix "vm": VM_COMMANDS, vm.cmd.<vm>.<action>, ...
var DefaultNames = Names{Prefix: DefaultPrefix}

func (n Names) upper() string { return strings.ToUpper(strings.ReplaceAll(n.Prefix, "-", "_")) }

// CommandsStream keeps the commands users publish (audit log).
func (n Names) CommandsStream() string { return n.upper() + "_COMMANDS" }

// EventsStream is the event store: every VM's events and the host events.
func (n Names) EventsStream() string { return n.upper() + "_EVENTS" }

// TasksStream is each host's work queue of backend calls.
func (n Names) TasksStream() string { return n.upper() + "_TASKS" }

// RecordsBucket holds one VmRecord per VM (key: the VM name).
func (n Names) RecordsBucket() string { return n.upper() + "_RECORDS" }

// HostsBucket holds the workers' heartbeats and the hosts' cordons.
func (n Names) HostsBucket() string { return n.upper() + "_HOSTS" }

// ImagesBucket holds the image stores' statuses (key: <host>.<name>).
func (n Names) ImagesBucket() string { return n.upper() + "_IMAGES" }

// SSHBucket holds per incarnation the generated SSH key, host keys and provisioning log.
func (n Names) SSHBucket() string { return n.upper() + "_SSH" }

// SSHKey is the key in VM_SSH of what (SSHPrivateKey, SSHHostKeys or
// SSHProvisionLog) for one incarnation of a VM:
// <vm>.<generation>.<what>, generation being the record's (1 for the
// first prepare). Each incarnation has entries of its own, so a new one
// never finds an older one's key, and the engines delete an
// incarnation's entries once it is destroyed (package sshkeys).
func SSHKey(vmName string, generation int, what string) string {
	return vmName + "." + strconv.Itoa(generation) + "." + what
}

// ParseSSHKey splits a VM_SSH key. Keys written before entries were per
// incarnation (<vm>.<what>) have generation 0.
func ParseSSHKey(key string) (vmName string, generation int, what string, ok bool) {
	parts := strings.Split(key, ".")
	switch len(parts) {
	case 2:
		return parts[0], 0, parts[1], parts[0] != "" && parts[1] != ""
	case 3:
		g, err := strconv.Atoi(parts[1])
		if err != nil || g < 1 || parts[0] == "" || parts[2] == "" {
			return "", 0, "", false
		}
		return parts[0], g, parts[2], true
	}
	return "", 0, "", false
}

// What VM_SSH keeps per VM.
const (
	SSHPrivateKey   = "key"
	SSHHostKeys     = "hostkeys"
	SSHProvisionLog = "provision"
)

// ImageKey is an image's key in VM_IMAGES: <host>.<name>.
func ImageKey(host, name string) string { return host + "." + name }

// Image is vm.image.<host>.<op>: a request to the worker of host about
// its image store (ImagePull, ImageRemove).
func (n Names) Image(host string, op ImageOp) string {
	return n.Prefix + ".image." + host + "." + string(op)
}

// ImageOp is the last token of an image request's subject.
type ImageOp string

const (
	ImagePull   ImageOp = "pull"
	ImageRemove ImageOp = "rm"
)

// CommandConsumer is the durable consumer on the commands stream that all
// engines share; a running engine always has pull requests open on it,
// which is how clients tell that commands are being decided.
func (n Names) CommandConsumer() string { return "engine" }

// Command is vm.cmd.<vm>.<action>: a command without an issuer token,
// which only full-trust identities (admin, engine) may publish.
func (n Names) Command(vmName, action string) string {
	return fmt.Sprintf("%s.cmd.%s.%s", n.Prefix, vmName, action)
}

// IssuedCommand is vm.cmd.<vm>.<action>.<issuer>: a command with its
// issuer's identity name as the last token. The server's permissions pin
// the token, so an operator's commands always name the operator, and the
// engine's per-issuer rate limit applies to it.
func (n Names) IssuedCommand(vmName, action, issuer string) string {
	if issuer == "" {
		return n.Command(vmName, action)
	}
	return n.Command(vmName, action) + "." + issuer
}

// IssuerCommands is every command an issuer may publish: vm.cmd.*.*.<issuer>.
func (n Names) IssuerCommands(issuer string) string { return n.Prefix + ".cmd.*.*." + issuer }

// Commands is every command subject: vm.cmd.>.
func (n Names) Commands() string { return n.Prefix + ".cmd.>" }

// EngineWriter is the writer token of the events the engines write
// (decisions, and the results of a forget). It starts with '_', so it is
// never a host id.
const EngineWriter = "_engine"

// Event is vm.evt.<vm>.<type>.<writer>: the writer is EngineWriter or the
// host id of the worker that wrote it. NATS permissions let a worker
// publish only with its own host as writer, so the token is authenticated:
// the fold takes a worker's result or observation only from the VM's host.
func (n Names) Event(vmName string, t EventType, writer string) string {
	return n.Prefix + ".evt." + vmName + "." + string(t) + "." + writer
}

// VMEvents is every event of one VM: vm.evt.<vm>.>.
func (n Names) VMEvents(vmName string) string { return n.Prefix + ".evt." + vmName + ".>" }

// Events is every VM's events: vm.evt.>.
func (n Names) Events() string { return n.Prefix + ".evt.>" }

// EventsOfType is every VM's events of one type: vm.evt.*.<type>.*.
func (n Names) EventsOfType(t EventType) string { return n.Prefix + ".evt.*." + string(t) + ".*" }

// WriterEvents is every event one writer may publish: vm.evt.*.*.<writer>
// (the worker of a host's publish permission).
func (n Names) WriterEvents(writer string) string { return n.Prefix + ".evt.*.*." + writer }

// HostEvent is vm.host.<host>.<type>: a change of a host's state
// (HostEventType), stored in the events stream beside the VMs' events.
func (n Names) HostEvent(host string, t HostEventType) string {
	return n.Prefix + ".host." + host + "." + string(t)
}

// HostEvents is every host event: vm.host.>.
func (n Names) HostEvents() string { return n.Prefix + ".host.>" }

// ParseHostEventSubject splits vm.host.<host>.<type>.
func (n Names) ParseHostEventSubject(subj string) (host string, t HostEventType, ok bool) {
	rest, found := strings.CutPrefix(subj, n.Prefix+".host.")
	if !found {
		return "", "", false
	}
	host, typ, found := strings.Cut(rest, ".")
	return host, HostEventType(typ), found && !strings.Contains(typ, ".")
}

// Task is vm.task.<host>.<vm>.
func (n Names) Task(host, vmName string) string { return n.Prefix + ".task." + host + "." + vmName }

// HostTasks is one host's tasks: vm.task.<host>.>.
func (n Names) HostTasks(host string) string { return n.Prefix + ".task." + host + ".>" }

// Tasks is every host's tasks: vm.task.>.
func (n Names) Tasks() string { return n.Prefix + ".task.>" }

// HostTaskConsumer is the durable consumer of one host's tasks, which
// the engines create (and update) from the host's heartbeat; the host's
// workers only pull from it. A worker may not create consumers: JetStream
// delivers whatever a consumer's filter matches, whatever the puller's
// subscribe permissions, so a worker that could create one could read any
// host's tasks.
func (n Names) HostTaskConsumer(host string) string { return "worker-" + host }

// Query is the micro-service group a worker answers on: vm.query.<host>.
func (n Names) Query(host string) string { return n.Prefix + ".query." + host }

// Console is vm.console.<host>.<vm>.<op>: a VM's serial console, relayed
// by the worker of its host (package relay). op is ConsoleAttach (a
// request: the recent output and where live output continues),
// ConsoleOut (output, published by the worker) or ConsoleIn (keystrokes).
func (n Names) Console(host, vmName string, op ConsoleOp) string {
	return n.Prefix + ".console." + host + "." + vmName + "." + string(op)
}

// ConsoleOp is the last token of a console subject.
type ConsoleOp string

const (
	ConsoleAttach ConsoleOp = "attach"
	ConsoleOut    ConsoleOp = "out"
	ConsoleIn     ConsoleOp = "in"
)

// Log is vm.log.<host>.<vm>: requests for pieces of a VM's console log,
// answered by the worker of its host.
func (n Names) Log(host, vmName string) string { return n.Prefix + ".log." + host + "." + vmName }

// Tunnel is vm.tunnel.<host>.<vm>.<id>.<op>: one TCP connection to a
// guest port, relayed by the worker of the VM's host. op is TunnelOpen
// (the request), TunnelUp (to the guest) or TunnelDown (from it).
func (n Names) Tunnel(host, vmName, id string, op TunnelOp) string {
	return n.Prefix + ".tunnel." + host + "." + vmName + "." + id + "." + string(op)
}

// TunnelOp is the last token of a tunnel subject.
type TunnelOp string

const (
	TunnelOpen TunnelOp = "open"
	TunnelUp   TunnelOp = "up"
	TunnelDown TunnelOp = "down"
)

// ParseCommandSubject splits vm.cmd.<vm>.<action>[.<issuer>]. ok is false
// when the subject has the wrong shape (the caller still rejects it; vmName
// is then the best guess at the name, for the rejection).
func (n Names) ParseCommandSubject(subj string) (vmName, action, issuer string, ok bool) {
	rest, found := strings.CutPrefix(subj, n.Prefix+".cmd.")
	if !found {
		return "", "", "", false
	}
	tok := strings.Split(rest, ".")
	switch {
	case len(tok) == 2:
		return tok[0], tok[1], "", tok[0] != "" && tok[1] != ""
	case len(tok) == 3 && tok[0] != "" && tok[2] != "" && validAction(tok[1]):
		// With an issuer. (A dotted VM name, vm.cmd.web.1.start, is not
		// one: its middle token is no action.)
		return tok[0], tok[1], tok[2], true
	case len(tok) == 3 && tok[0] != "" && tok[1] != "" && tok[2] != "" && !validAction(tok[2]):
		// An unknown action with an issuer (vm.cmd.web1.reboot.alice): the
		// action is wrong, not the VM name; the caller rejects the action.
		return tok[0], tok[1], tok[2], true
	case len(tok) < 2:
		return rest, "", "", false
	}
	return strings.Join(tok[:len(tok)-1], "."), tok[len(tok)-1], "", false
}

// ParseEventSubject splits vm.evt.<vm>.<type>.<writer>.
func (n Names) ParseEventSubject(subj string) (vmName string, t EventType, writer string, ok bool) {
	rest, found := strings.CutPrefix(subj, n.Prefix+".evt.")
	if !found {
		return "", "", "", false
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return "", "", "", false
	}
	return parts[0], EventType(parts[1]), parts[2], true
}

func validAction(s string) bool {
	_, err := ParseAction(s)
	return err == nil
}

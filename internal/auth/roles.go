package auth

import (
	"fmt"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/jwt/v2"
)

// Role is what an identity may do; docs/trust.md has the table.
type Role string

const (
	// RoleAdmin may do everything (the nats CLI's identity, vmctl's on the
	// engine's machine).
	RoleAdmin Role = "admin"
	// RoleEngine is an engine's identity: everything, as the admin.
	RoleEngine Role = "engine"
	// RoleOperator drives VMs: publishes commands, reads events, records
	// and hosts, asks workers' queries, cordons hosts.
	RoleOperator Role = "operator"
	// RoleViewer reads events, records and hosts, and asks workers'
	// queries; it cannot change anything.
	RoleViewer Role = "viewer"
	// RoleWorker speaks for one host: pulls only its own tasks, heartbeats
	// only as itself, writes events only with its host as writer, answers
	// only its own queries.
	RoleWorker Role = "worker"
)

// Roles lists the roles.
var Roles = []Role{RoleAdmin, RoleEngine, RoleOperator, RoleViewer, RoleWorker}

// Identity is a role, for a worker its host, and for the others a name,
// in one installation (Names: its subject prefix and stream names).
type Identity struct {
	Role  Role
	Host  string // RoleWorker only
	User  string // the others: a name for the credentials (default: the role)
	Names api.Names
}

// Name names the identity in its JWT and file name.
func (id Identity) Name() string {
	switch {
	case id.Role == RoleWorker:
		return "worker-" + id.Host
	case id.User != "":
		return id.User
	}
	return string(id.Role)
}

// InboxRoot is the first token of every identity's inbox prefix. Each
// identity may subscribe only under its own prefix
// (InboxRoot.<role>.<name>), so no one reads another's replies (KV gets of
// private keys, JetStream API answers, consumer deliveries); responders
// (workers) may publish under the root, and only there, so a request's
// reply subject cannot make them write anywhere else.
const InboxRoot = "_INBOX_VMHERD"

// token is the last token of the identity's inbox prefix: its host for a
// worker, its name for the others.
func (id Identity) token() string {
	if id.Role == RoleWorker {
		return id.Host
	}
	return id.Name()
}

// InboxPrefix is the inbox prefix the identity's connections must use
// (nats.CustomInboxPrefix, the nats CLI's --inbox-prefix): the only
// replies it may receive are those under it.
func (id Identity) InboxPrefix() string {
	return InboxRoot + "." + string(id.Role) + "." + id.token()
}

// Permissions returns the identity's NATS permissions.
func (id Identity) Permissions() (jwt.Permissions, error) {
	n := id.Names
	if n.Prefix == "" {
		n = api.DefaultNames
	}
	var p jwt.Permissions
	if id.Role == RoleWorker {
		if err := api.ValidateHost(id.Host); err != nil {
			return p, fmt.Errorf("auth: worker identity: %w", err)
		}
	} else if err := api.ValidateIdentity(id.Name()); err != nil {
		return p, fmt.Errorf("auth: %s identity: %w", id.Role, err)
	}
	inbox := id.InboxPrefix() + ".>"
	switch id.Role {
	case RoleAdmin, RoleEngine:
		p.Pub.Allow.Add(">")
		// Its own inbox is listed although ">" covers it: clients read
		// their inbox prefix from the credentials (CredsInboxPrefix).
		p.Sub.Allow.Add(">", inbox)
	case RoleOperator, RoleViewer:
		streams := []string{n.EventsStream(), "KV_" + n.RecordsBucket(), "KV_" + n.HostsBucket(), "KV_" + n.ImagesBucket()}
		if id.Role == RoleOperator {
			streams = append(streams, "KV_"+n.SSHBucket())
		}
		reader(&p, n, streams)
		p.Sub.Allow.Add(inbox)
		// Every reader may read console logs.
		p.Pub.Allow.Add(n.Log("*", "*"))
		if id.Role == RoleOperator {
			// Commands only with its own name as the issuer token: what
			// the engines record and rate-limit.
			p.Pub.Allow.Add(n.IssuerCommands(id.Name()))
			// Consoles and tunnels: type and connect, see the output.
			p.Pub.Allow.Add(n.Console("*", "*", api.ConsoleAttach), n.Console("*", "*", api.ConsoleIn),
				n.Tunnel("*", "*", "*", api.TunnelOpen), n.Tunnel("*", "*", "*", api.TunnelUp))
			p.Sub.Allow.Add(n.Console("*", "*", api.ConsoleOut), n.Tunnel("*", "*", "*", api.TunnelDown))
			// Image pulls and removals, on any host.
			p.Pub.Allow.Add(n.Image("*", api.ImagePull), n.Image("*", api.ImageRemove))
			// VM_SSH (generated keys, host keys, provisioning logs): read
			// (above) and write; viewers and workers may not read it.
			p.Pub.Allow.Add("$KV." + n.SSHBucket() + ".>")
			p.Pub.Allow.Add("$KV." + n.HostsBucket() + ".*.cordon") // cordon, uncordon, drain
		}
	case RoleWorker:
		worker(&p, n, id.Host)
		p.Sub.Allow.Add(inbox)
	default:
		return p, fmt.Errorf("auth: unknown role %q (roles: %v)", id.Role, Roles)
	}
	return p, nil
}

// PersonSubs bounds the subscriptions of one operator's or viewer's
// connection (vmctl needs a handful); NATS has no per-user bound on
// connections or consumers, see Open for the account's.
const PersonSubs = 1024

// subs is the identity's subscription limit (-1: none): workers and
// engines subscribe per VM, console and tunnel.
func (id Identity) subs() int64 {
	if id.Role == RoleOperator || id.Role == RoleViewer {
		return PersonSubs
	}
	return -1
}

// streamsOf is every stream and bucket of the installation: the ones
// events.Check looks up (stream info only).
func streamsOf(n api.Names) []string {
	return []string{n.CommandsStream(), n.EventsStream(), n.TasksStream(),
		"KV_" + n.RecordsBucket(), "KV_" + n.HostsBucket(), "KV_" + n.SSHBucket(), "KV_" + n.ImagesBucket()}
}

// getVerbs are the JetStream API verbs that read single messages of
// stream st: direct gets (also batched, how events.KVEntries lists a
// bucket) and the API's message get.
func getVerbs(p *jwt.Permissions, st string) {
	p.Pub.Allow.Add("$JS.API.STREAM.MSG.GET."+st, "$JS.API.DIRECT.GET."+st, "$JS.API.DIRECT.GET."+st+".>")
}

// consumerVerbs are those of an ordered consumer of stream st (vmctl's
// reads of a VM's events): created with its name in the subject
// ($JS.API.CONSUMER.CREATE.<st>.<name>[.<filter>], never the legacy
// ephemeral or durable forms), asked for info, pulled from. Not: deleting
// a consumer (one could delete the engines'), listing consumers, any
// stream admin verb (create, update, delete, purge, message delete,
// snapshot, restore). Whether a consumer delivers to a subject (push) is
// in the request's body, which permissions cannot see: the engines remove
// such consumers unless they deliver to an inbox (package jspolicy).
func consumerVerbs(p *jwt.Permissions, st string) {
	p.Pub.Allow.Add(
		"$JS.API.CONSUMER.CREATE."+st+".*", "$JS.API.CONSUMER.CREATE."+st+".*.>",
		"$JS.API.CONSUMER.INFO."+st+".*", "$JS.API.CONSUMER.MSG.NEXT."+st+".*",
	)
}

// reader is what every human identity may read: messages of the given
// streams and buckets, ordered consumers of the events stream, every
// stream's info, the engine consumer's info (vmctl's "is an engine
// running?"), and the workers' queries. It cannot create consumers on
// VM_TASKS or VM_COMMANDS, nor on the buckets (events.KVEntries lists
// them).
func reader(p *jwt.Permissions, n api.Names, streams []string) {
	p.Pub.Allow.Add("$JS.API.INFO", "$JS.API.CONSUMER.INFO."+n.CommandsStream()+"."+n.CommandConsumer())
	for _, st := range streamsOf(n) {
		p.Pub.Allow.Add("$JS.API.STREAM.INFO." + st)
	}
	for _, st := range streams {
		getVerbs(p, st)
	}
	consumerVerbs(p, n.EventsStream())
	p.Pub.Allow.Add(n.Prefix + ".query.*.>")
}

// worker is the permission of the worker of host h.
func worker(p *jwt.Permissions, n api.Names, h string) {
	tasks, cons := n.TasksStream(), n.HostTaskConsumer(h)
	p.Pub.Allow.Add("$JS.API.INFO")
	for _, st := range streamsOf(n) {
		p.Pub.Allow.Add("$JS.API.STREAM.INFO." + st)
	}
	p.Pub.Allow.Add(
		// Its own task consumer: bind, pull, ack. Never create one.
		"$JS.API.CONSUMER.INFO."+tasks+"."+cons,
		"$JS.API.CONSUMER.MSG.NEXT."+tasks+"."+cons,
		"$JS.ACK."+tasks+"."+cons+".>",
		// Its heartbeat, and no other host's.
		"$KV."+n.HostsBucket()+"."+h,
		// Its images' status, and no other host's.
		"$KV."+n.ImagesBucket()+"."+h+".*",
		// Events only with its own host as writer.
		n.WriterEvents(h),
	)
	// Reading events (an earlier result of a task, the VM's last event),
	// records (re-adoption) and its images' status: message gets only, no
	// consumer.
	for _, st := range []string{n.EventsStream(), "KV_" + n.RecordsBucket(), "KV_" + n.ImagesBucket()} {
		getVerbs(p, st)
	}
	// Its query service (vm.query.<h>.*) and the micro service discovery
	// of its own service only (vmherd-worker-<h>, worker.ServiceName): a
	// worker cannot answer `nats micro` for another host's service.
	svc := "vmherd-worker-" + h
	p.Sub.Allow.Add(n.Query(h)+".>", "$SRV.PING", "$SRV.INFO", "$SRV.STATS",
		"$SRV.*."+svc, "$SRV.*."+svc+".>")
	// The relay of its own VMs' consoles, logs and tunnels (package relay).
	p.Sub.Allow.Add(
		n.Console(h, "*", api.ConsoleAttach), n.Console(h, "*", api.ConsoleIn),
		n.Log(h, "*"),
		n.Tunnel(h, "*", "*", api.TunnelOpen), n.Tunnel(h, "*", "*", api.TunnelUp),
	)
	p.Pub.Allow.Add(n.Console(h, "*", api.ConsoleOut), n.Tunnel(h, "*", "*", api.TunnelDown))
	// Its image store's requests.
	p.Sub.Allow.Add(n.Image(h, api.ImagePull), n.Image(h, api.ImageRemove))
	// Answers go to inboxes only: the requesters' (InboxRoot), or the
	// default _INBOX of an admin's plain nats CLI. No "allow responses":
	// with it, a request whose reply subject is vm.evt... or $KV... would
	// let the worker publish its answer there.
	p.Pub.Allow.Add(InboxRoot+".>", "_INBOX.>")
	// Except a joining host's: only the join service answers it.
	p.Pub.Deny.Add(InboxRoot + ".join.>")
}

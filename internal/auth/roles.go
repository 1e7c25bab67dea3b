package auth

import (
	"fmt"
	"time"

	"github.com/nats-io/jwt/v2"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/vm"
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
	Names events.Names
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

// InboxPrefix is the inbox prefix a worker's connection must use: each
// host gets its own, so one worker cannot read the replies meant for
// another. Other roles use NATS's default _INBOX.
func (id Identity) InboxPrefix() string {
	if id.Role == RoleWorker {
		return "_INBOX_" + id.Host
	}
	return ""
}

// Permissions returns the identity's NATS permissions.
func (id Identity) Permissions() (jwt.Permissions, error) {
	n := id.Names
	if n.Prefix == "" {
		n = events.DefaultNames
	}
	var p jwt.Permissions
	switch id.Role {
	case RoleAdmin, RoleEngine:
		p.Pub.Allow.Add(">")
		p.Sub.Allow.Add(">")
	case RoleOperator, RoleViewer:
		if err := vm.ValidateIdentity(id.Name()); err != nil {
			return p, fmt.Errorf("auth: %s identity: %w", id.Role, err)
		}
		reader(&p, n)
		// Every reader may read console logs.
		p.Pub.Allow.Add(n.Log("*", "*"))
		if id.Role == RoleOperator {
			// Commands only with its own name as the issuer token: what
			// the engines record and rate-limit.
			p.Pub.Allow.Add(n.IssuerCommands(id.Name()))
			// Consoles and tunnels: type and connect, see the output.
			p.Pub.Allow.Add(n.Console("*", "*", events.ConsoleAttach), n.Console("*", "*", events.ConsoleIn),
				n.Tunnel("*", "*", "*", events.TunnelOpen), n.Tunnel("*", "*", "*", events.TunnelUp))
			p.Sub.Allow.Add(n.Console("*", "*", events.ConsoleOut), n.Tunnel("*", "*", "*", events.TunnelDown))
			// Image pulls and removals, on any host.
			p.Pub.Allow.Add(n.Image("*", events.ImagePull), n.Image("*", events.ImageRemove))
			// VM_SSH (generated keys, host keys, provisioning logs): read
			// and write; viewers and workers may not read it.
			ssh := "KV_" + n.SSHBucket()
			p.Pub.Allow.Add("$KV."+n.SSHBucket()+".>", "$JS.API.DIRECT.GET."+ssh, "$JS.API.DIRECT.GET."+ssh+".>",
				"$JS.API.STREAM.MSG.GET."+ssh, "$JS.API.CONSUMER.CREATE."+ssh+".>", "$JS.API.CONSUMER.MSG.NEXT."+ssh+".>",
				"$JS.API.CONSUMER.DELETE."+ssh+".>")
			p.Pub.Allow.Add("$KV." + n.HostsBucket() + ".*.cordon") // cordon, uncordon, drain
		}
	case RoleWorker:
		if err := vm.ValidateHost(id.Host); err != nil {
			return p, fmt.Errorf("auth: worker identity: %w", err)
		}
		worker(&p, n, id.Host)
	default:
		return p, fmt.Errorf("auth: unknown role %q (roles: %v)", id.Role, Roles)
	}
	return p, nil
}

// reader is what every human identity may read: the events stream and the
// two buckets (with direct gets and ordered consumers, which only read),
// stream and consumer info, the engine consumer's info (vmctl's "is an
// engine running?"), and the workers' queries. It cannot create consumers
// on VM_TASKS or VM_COMMANDS.
func reader(p *jwt.Permissions, n events.Names) {
	p.Pub.Allow.Add("$JS.API.INFO", "$JS.API.STREAM.INFO.>",
		"$JS.API.CONSUMER.INFO."+n.CommandsStream()+"."+n.CommandConsumer())
	for _, st := range []string{n.EventsStream(), "KV_" + n.RecordsBucket(), "KV_" + n.HostsBucket(), "KV_" + n.ImagesBucket()} {
		p.Pub.Allow.Add(
			"$JS.API.STREAM.MSG.GET."+st,
			"$JS.API.DIRECT.GET."+st, "$JS.API.DIRECT.GET."+st+".>",
			"$JS.API.CONSUMER.CREATE."+st+".>", "$JS.API.CONSUMER.INFO."+st+".>",
			"$JS.API.CONSUMER.MSG.NEXT."+st+".>", "$JS.API.CONSUMER.DELETE."+st+".>",
		)
	}
	p.Pub.Allow.Add(n.Prefix + ".query.*.>")
	p.Sub.Allow.Add("_INBOX.>")
}

// worker is the permission of the worker of host h.
func worker(p *jwt.Permissions, n events.Names, h string) {
	tasks, cons := n.TasksStream(), n.HostTaskConsumer(h)
	p.Pub.Allow.Add(
		"$JS.API.INFO", "$JS.API.STREAM.INFO.>",
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
	// Reading events (an earlier result of a task, the VM's last event)
	// and records (re-adoption): direct gets and ordered consumers.
	for _, st := range []string{n.EventsStream(), "KV_" + n.RecordsBucket(), "KV_" + n.ImagesBucket()} {
		p.Pub.Allow.Add(
			"$JS.API.STREAM.MSG.GET."+st,
			"$JS.API.DIRECT.GET."+st, "$JS.API.DIRECT.GET."+st+".>",
			"$JS.API.CONSUMER.CREATE."+st+".>", "$JS.API.CONSUMER.MSG.NEXT."+st+".>",
			"$JS.API.CONSUMER.DELETE."+st+".>",
		)
	}
	// Its query service (vm.query.<h>.*) and the micro service discovery.
	p.Sub.Allow.Add(n.Query(h)+".>", "$SRV.>", "_INBOX_"+h+".>")
	// The relay of its own VMs' consoles, logs and tunnels (package relay).
	p.Sub.Allow.Add(
		n.Console(h, "*", events.ConsoleAttach), n.Console(h, "*", events.ConsoleIn),
		n.Log(h, "*"),
		n.Tunnel(h, "*", "*", events.TunnelOpen), n.Tunnel(h, "*", "*", events.TunnelUp),
	)
	p.Pub.Allow.Add(n.Console(h, "*", events.ConsoleOut), n.Tunnel(h, "*", "*", events.TunnelDown))
	// Its image store's requests.
	p.Sub.Allow.Add(n.Image(h, events.ImagePull), n.Image(h, events.ImageRemove))
	p.Resp = &jwt.ResponsePermission{MaxMsgs: 1, Expires: time.Minute}
}

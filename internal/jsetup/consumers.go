package jsetup

import (
	"context"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"
)

// DropConsumer deletes an ephemeral consumer its maker is done with, so
// that it does not stay on the server until its inactive threshold (an
// ordered consumer's is 5 minutes unless set). It uses a context of its
// own, so it also runs after the maker's was cancelled (Ctrl-C), and
// ignores errors: the threshold is the backstop.
func DropConsumer(st jetstream.Stream, cons jetstream.Consumer) {
	info := cons.CachedInfo()
	if info == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = st.DeleteConsumer(ctx, info.Name)
}

// ReaderIdle is the inactive threshold of the ephemeral consumers that
// whole-stream readers make (vmctl events, engine rebuild, tests): they
// delete them when done (DropConsumer), and the server drops one whose
// reader died after this long without a pull request.
const ReaderIdle = 5 * time.Second

// MaxConsumers are the streams' consumer limits (stream max_consumers),
// set by the engines with the rest of each stream's settings. They sit far
// above ConsumerBound, so they are never what stops vmherd's own parts,
// and keep a leak (anyone's) from growing without end. The buckets'
// streams follow the server's default: natsserver.DefaultMaxConsumers
// (1,000) in the embedded server, nats-server's own (also 1,000) unless a
// fleet's configuration sets jetstream { limits { default_max_consumers } }.
var MaxConsumers = struct{ Commands, Events, Tasks int }{
	// The engines' shared consumer, and room for an operator's own
	// audit readers.
	Commands: 64,
	// One per engine, the whole-stream readers running now, and the
	// engines' look-ups of old commands' decisions (ConsumerBound).
	Events: 1000,
	// One per host: a fleet of up to 10,000 hosts (nats-server's
	// default, 1,000, would refuse the 1,001st host's task consumer).
	Tasks: 10000,
}

// ConsumerBound is the most consumers each stream (by stream name, the
// buckets' KV_ streams included) has while engines engines and hosts hosts
// run, whatever the rate and number of commands and of vmctl invocations,
// when no whole-stream reader runs: vmctl waits, reads and lists by direct
// gets and makes none (docs/architecture.md, "Consumers and their
// bound"). Whole-stream readers add one each while they run (vmctl events
// and engine rebuild on VM_EVENTS; vmctl image pull and up waiting for
// pulls on KV_VM_IMAGES), and an engine's look-up of the earlier
// decision of a command older than half the duplicate window adds one on
// VM_EVENTS while it runs (deleted when done, 30 s inactive threshold).
func ConsumerBound(n api.Names, engines, hosts int) map[string]int {
	return map[string]int{
		n.CommandsStream():        1,       // engine, shared by the engines
		n.EventsStream():          engines, // each engine's projector
		n.TasksStream():           hosts,   // worker-<host>
		"KV_" + n.RecordsBucket(): engines, // each engine's VM_SSH sweeper (package sshkeys)
		"KV_" + n.HostsBucket():   engines, // each engine's host registry
		"KV_" + n.ImagesBucket():  engines, // each engine's image view
		"KV_" + n.SSHBucket():     0,
	}
}

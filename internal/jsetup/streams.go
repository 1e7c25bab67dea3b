package jsetup

import (
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
)

// HostTaskConsumerConfig is the configuration of HostTaskConsumer(host):
// the ack wait and max ack pending the host's worker asked for in its
// heartbeat.
func HostTaskConsumerConfig(n api.Names, host string, ackWait time.Duration, maxAckPending int) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       n.HostTaskConsumer(host),
		Description:   "vmherd worker tasks for host " + host,
		FilterSubject: n.HostTasks(host),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       ackWait,
		MaxAckPending: maxAckPending,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	}
}

// Settings are the stream and bucket settings chosen at start-up.
type Settings struct {
	Replicas int
	// CommandsMaxAge is how long commands are kept for audit (0: forever).
	CommandsMaxAge time.Duration
	// DuplicateWindow of the event and task streams: longer than the
	// longest retry path (a worker or engine restart plus a redelivery).
	DuplicateWindow time.Duration
}

// DefaultSettings are used when the operator sets nothing.
var DefaultSettings = Settings{
	Replicas:        1,
	CommandsMaxAge:  30 * 24 * time.Hour,
	DuplicateWindow: 15 * time.Minute,
}

// StreamConfigs returns the three streams.
func StreamConfigs(n api.Names, s Settings) []jetstream.StreamConfig {
	if s.Replicas == 0 {
		s.Replicas = 1
	}
	return []jetstream.StreamConfig{
		{
			Name:         n.CommandsStream(),
			Description:  "vmherd lifecycle commands, as published by users (audit log)",
			Subjects:     []string{n.Commands()},
			Storage:      jetstream.FileStorage,
			Retention:    jetstream.LimitsPolicy,
			MaxAge:       s.CommandsMaxAge,
			Duplicates:   2 * time.Minute,
			Replicas:     s.Replicas,
			AllowDirect:  true,
			MaxConsumers: MaxConsumers.Commands,
		},
		{
			Name:         n.EventsStream(),
			Description:  "vmherd event store: every VM's events, the source of truth",
			Subjects:     []string{n.Events(), n.HostEvents()},
			Storage:      jetstream.FileStorage,
			Retention:    jetstream.LimitsPolicy,
			Discard:      jetstream.DiscardNew, // never drop old events to make room
			MaxMsgs:      -1,
			MaxBytes:     -1,
			Duplicates:   s.DuplicateWindow,
			Replicas:     s.Replicas,
			AllowDirect:  true,
			MaxConsumers: MaxConsumers.Events,
		},
		{
			Name:         n.TasksStream(),
			Description:  "vmherd tasks: backend calls for each host's worker",
			Subjects:     []string{n.Tasks()},
			Storage:      jetstream.FileStorage,
			Retention:    jetstream.WorkQueuePolicy,
			Duplicates:   s.DuplicateWindow,
			Replicas:     s.Replicas,
			MaxConsumers: MaxConsumers.Tasks,
		},
	}
}

// BucketConfigs returns the two KV buckets.
func BucketConfigs(n api.Names, s Settings) []jetstream.KeyValueConfig {
	if s.Replicas == 0 {
		s.Replicas = 1
	}
	return []jetstream.KeyValueConfig{
		{
			Bucket:      n.RecordsBucket(),
			Description: "vmherd projection: one VmRecord per VM, rebuilt from the event stream",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    s.Replicas,
		},
		{
			Bucket:      n.HostsBucket(),
			Description: "vmherd hosts: worker heartbeats (backends, capacity, usage) and cordons; a host stays until forgotten",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    s.Replicas,
		},
		{
			Bucket:      n.SSHBucket(),
			Description: "vmherd ssh: per VM, the generated private key, the guest's host keys as first seen, the last provisioning log (operators and admins only)",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    s.Replicas,
		},
		{
			Bucket:      n.ImagesBucket(),
			Description: "vmherd images: what each worker's image store holds or is pulling (<host>.<name>)",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    s.Replicas,
		},
	}
}

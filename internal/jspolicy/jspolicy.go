// Package jspolicy is what the engines enforce on JetStream consumers
// that NATS permissions cannot express. A permission sees a request's
// subject, never its body, and the body of a consumer create holds the
// deliver subject (push consumers) and whether the consumer is durable:
// so whoever may create a consumer (vmctl's ordered consumers need it)
// could have the server deliver a stream's messages to any subject,
// writing where the creator may not publish (a VM's console input, a
// worker's image service), or keep a consumer for ever. The server does
// not check the deliver subject (nats-server #8274).
//
// The policy, on every stream of the installation, whoever created the
// consumer (admins too):
//
//   - a push consumer delivers to an inbox (first token _INBOX…), where
//     no stream or service listens: a KV watch does, nothing else vmherd
//     runs needs another;
//   - the events stream and the buckets, which people read, hold no
//     durable consumer and no ephemeral one that outlives MaxInactive
//     idle: they are the engines' and clients' ordered consumers and
//     watches.
//
// The engines learn of each consumer create from the server's API audit
// advisory and sweep every stream at start and every SweepEvery; a
// consumer that breaks the policy is deleted, and logged with who created
// it. Between its creation and its deletion it may deliver: the services
// it could reach refuse what the server relays (package origin).
package jspolicy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/origin"
)

// MaxInactive is the longest inactive threshold a consumer of a stream
// people read may have (jetstream's ordered consumers ask for 5 minutes).
const MaxInactive = time.Hour

// SweepEvery is how often every stream's consumers are checked, beside
// the advisories (which an engine misses while it is down).
const SweepEvery = time.Minute

// Audit is the subject of the server's JetStream API audit advisories.
const Audit = "$JS.EVENT.ADVISORY.API"

// Violation says why a consumer breaks the policy ("" if it does not).
func Violation(n api.Names, stream string, cfg jetstream.ConsumerConfig) string {
	if cfg.DeliverSubject != "" && !origin.Inbox(cfg.DeliverSubject) {
		return fmt.Sprintf("it delivers to %q, which is no inbox", cfg.DeliverSubject)
	}
	if !readable(n, stream) {
		return ""
	}
	switch {
	case cfg.Durable != "":
		return fmt.Sprintf("it is durable on %s, which people read (only ordered consumers belong there)", stream)
	case cfg.InactiveThreshold <= 0 || cfg.InactiveThreshold > MaxInactive:
		return fmt.Sprintf("its inactive threshold %s is not within (0, %s]", cfg.InactiveThreshold, MaxInactive)
	}
	return ""
}

// readable reports whether people read the stream: the events stream and
// the buckets.
func readable(n api.Names, stream string) bool {
	if stream == n.EventsStream() {
		return true
	}
	for _, b := range []string{n.RecordsBucket(), n.HostsBucket(), n.ImagesBucket(), n.SSHBucket()} {
		if stream == "KV_"+b {
			return true
		}
	}
	return false
}

// streams are the installation's streams and buckets.
func streams(n api.Names) []string {
	return []string{n.CommandsStream(), n.EventsStream(), n.TasksStream(),
		"KV_" + n.RecordsBucket(), "KV_" + n.HostsBucket(), "KV_" + n.ImagesBucket(), "KV_" + n.SSHBucket()}
}

// Enforcer deletes the consumers that break the policy.
type Enforcer struct {
	JS    jetstream.JetStream
	Names api.Names
	Log   *slog.Logger
}

// Run enforces the policy until ctx ends: on every consumer create the
// server audits, and on every stream at start and every SweepEvery.
func (e *Enforcer) Run(ctx context.Context) error {
	creates := make(chan *nats.Msg, 256)
	sub, err := e.JS.Conn().ChanSubscribe(Audit, creates)
	if err != nil {
		return fmt.Errorf("jspolicy: watching the API audit: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	e.Sweep(ctx)
	t := time.NewTicker(SweepEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			e.Sweep(ctx)
		case m := <-creates:
			e.audited(ctx, m.Data)
		}
	}
}

// audit is the part of an API audit advisory the policy reads.
type audit struct {
	Subject  string `json:"subject"`
	Response string `json:"response"`
	Client   *struct {
		User    string `json:"user"`
		Name    string `json:"name"`
		NameTag string `json:"name_tag"`
	} `json:"client"`
}

// audited checks the consumer an audited create names. The advisory only
// says which consumer to look at: its configuration is read from the
// server, so a forged advisory (the server can be made to publish stored
// bytes on any subject, package origin) makes the policy look, not act.
func (e *Enforcer) audited(ctx context.Context, data []byte) {
	var a audit
	if json.Unmarshal(data, &a) != nil ||
		!strings.HasPrefix(a.Subject, "$JS.API.CONSUMER.CREATE.") && !strings.HasPrefix(a.Subject, "$JS.API.CONSUMER.DURABLE.CREATE.") {
		return
	}
	var created jetstream.ConsumerInfo
	if json.Unmarshal([]byte(a.Response), &created) != nil || created.Name == "" || !slices.Contains(streams(e.Names), created.Stream) {
		return // refused by the server, or not the installation's
	}
	ictx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	info, err := e.info(ictx, created.Stream, created.Name)
	if err != nil {
		return // gone already
	}
	who := "unknown"
	if c := a.Client; c != nil {
		who = fmt.Sprintf("%s (user %s, connection %q)", c.NameTag, c.User, c.Name)
	}
	e.check(ctx, info.Stream, info.Name, info.Config, who)
}

// info reads a consumer's info, pull or push.
func (e *Enforcer) info(ctx context.Context, stream, name string) (*jetstream.ConsumerInfo, error) {
	c, err := e.JS.Consumer(ctx, stream, name)
	if err == nil {
		return c.CachedInfo(), nil
	}
	if !errors.Is(err, jetstream.ErrNotPullConsumer) {
		return nil, err
	}
	pc, err := e.JS.PushConsumer(ctx, stream, name)
	if err != nil {
		return nil, err
	}
	return pc.CachedInfo(), nil
}

// Sweep checks every consumer of the installation's streams.
func (e *Enforcer) Sweep(ctx context.Context) {
	for _, name := range streams(e.Names) {
		st, err := e.JS.Stream(ctx, name)
		if err != nil {
			continue
		}
		l := st.ListConsumers(ctx)
		for info := range l.Info() {
			e.check(ctx, name, info.Name, info.Config, "")
		}
		if err := l.Err(); err != nil && ctx.Err() == nil {
			e.Log.Warn("jspolicy: listing consumers failed", "stream", name, "err", err)
		}
	}
}

func (e *Enforcer) check(ctx context.Context, stream, name string, cfg jetstream.ConsumerConfig, who string) {
	if !slices.Contains(streams(e.Names), stream) {
		return
	}
	why := Violation(e.Names, stream, cfg)
	if why == "" {
		return
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := e.JS.DeleteConsumer(dctx, stream, name)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		return // another engine was first
	}
	log := e.Log.With("stream", stream, "consumer", name, "why", why)
	if who != "" {
		log = log.With("created_by", who)
	}
	if err != nil {
		log.Error("jspolicy: deleting a consumer that breaks the policy failed", "err", err)
		return
	}
	log.Warn("jspolicy: deleted a consumer that breaks the policy")
}

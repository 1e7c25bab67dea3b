// Package engine turns commands into decisions. It consumes VM_COMMANDS,
// runs each VM's state machine, appends accepted/rejected events with
// per-VM optimistic concurrency, hands accepted commands to the chosen
// host's worker, and keeps the VM_RECORDS projection.
package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/keyed"
	"github.com/vmherd/vmherd/internal/metrics"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/schemas"
)

// JetStream is what an engine needs of a JetStream context (a
// jetstream.JetStream has it): the event store's and the projector's
// needs, its durable consumers (the commands, each host's tasks), the
// buckets, and publishes (tasks, decisions stored asynchronously).
type JetStream interface {
	events.StoreJS
	events.KVReader
	projection.JetStream
	jsetup.ConsumerCreator
	PublishAsync(subject string, data []byte, opts ...jetstream.PublishOpt) (jetstream.PubAckFuture, error)
}

// Config of an engine.
type Config struct {
	JS       JetStream
	Names    api.Names
	Settings jsetup.Settings
	Log      *slog.Logger
	// ID names this engine's own consumers (the projection); unique per engine.
	ID string
	// HostLostAfter: a host that has not heartbeated for this long is lost.
	HostLostAfter time.Duration
	// Concurrency bounds the commands decided at once (across VMs).
	Concurrency int
	// AckWait of the command consumer.
	AckWait time.Duration
	// Quotas bound the VMs (not destroyed) a prepare may add to.
	Quotas Quotas
	// Metrics, if set, records decisions, VMs by state and host heartbeats.
	Metrics *metrics.Set
	// RateLimit bounds each issuer's commands per second.
	RateLimit RateLimit
	// RetainDestroyed: a VM destroyed longer ago than this is purged
	// (its record and events removed, see runRetention); 0 keeps
	// destroyed VMs for ever.
	RetainDestroyed time.Duration
	// StateDir keeps the engine's own files (the projection checkpoint);
	// "" keeps none (the projection then replays from the start on restart).
	StateDir string
}

// Engine decides commands.
type Engine struct {
	cfg   Config
	log   *slog.Logger
	store *events.Store
	hosts *hosts.Registry
	proj  *projection.Projector
	exec  *keyed.Serial
	adm   admission
	// limits and overRate: the per-issuer rate limit and the bounded
	// pool that stores its rejections.
	limits   *issuerLimits
	overRate chan struct{}
	// images: which images are ready where (VM_IMAGES).
	images *imageIndex
	// placed counts what the VMs on each host take, for placement.
	placed *placedCount
}

// New builds an engine. Streams and buckets must exist (jsetup.Ensure).
func New(ctx context.Context, cfg Config) (*Engine, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.HostLostAfter == 0 {
		cfg.HostLostAfter = hosts.DefaultLostAfter
	}
	if cfg.Concurrency == 0 {
		cfg.Concurrency = 256
	}
	if cfg.AckWait == 0 {
		cfg.AckWait = 30 * time.Second
	}
	if cfg.ID == "" {
		return nil, errors.New("engine: an engine id is required")
	}
	st, err := events.NewStore(ctx, cfg.JS, cfg.Names, api.EngineWriter)
	if err != nil {
		return nil, err
	}
	e := &Engine{
		cfg:      cfg,
		log:      cfg.Log.With("part", "engine", "engine", cfg.ID),
		store:    st,
		hosts:    hosts.NewRegistry(cfg.HostLostAfter),
		exec:     keyed.New(cfg.Concurrency),
		placed:   newPlacedCount(cfg.Metrics),
		limits:   newIssuerLimits(cfg.RateLimit),
		images:   newImageIndex(),
		overRate: make(chan struct{}, cfg.Concurrency),
	}
	e.adm = admission{hosts: e.hosts, lostAfter: cfg.HostLostAfter, placed: e.placed.on, quotas: cfg.Quotas, count: e.placed, hasImage: e.images.has, book: e.placed}
	e.proj = &projection.Projector{JS: cfg.JS, Names: cfg.Names, Log: e.log, Observe: e.placed.observe}
	if cfg.StateDir != "" {
		e.proj.Checkpoint = filepath.Join(cfg.StateDir, "projection-"+cfg.ID+".seq")
	}
	return e, nil
}

// Hosts is the engine's view of the workers.
func (e *Engine) Hosts() *hosts.Registry { return e.hosts }

// Run serves until ctx ends, then stops taking commands and waits for the
// ones in progress to be decided (drain) before returning.
func (e *Engine) Run(ctx context.Context) error {
	// Against a cluster still electing leaders these reads time out: they
	// are retried (and logged) like every start-up step.
	var hostsKV jetstream.KeyValue
	if err := jsetup.RetryStartup(ctx, e.log, "the hosts bucket", func(sctx context.Context) (err error) {
		hostsKV, err = e.cfg.JS.KeyValue(sctx, e.cfg.Names.HostsBucket())
		return err
	}); err != nil {
		return fmt.Errorf("engine: opening %s: %w", e.cfg.Names.HostsBucket(), err)
	}
	e.cfg.Metrics.Register(hostCollector{e.hosts})
	// What the VMs already placed take, before the first placement; the
	// projector's folds keep the count from here on.
	var recs map[string]*api.VmRecord
	if err := jsetup.RetryStartup(ctx, e.log, "the records, to count what is placed", func(sctx context.Context) (err error) {
		recs, err = projection.Load(sctx, e.cfg.JS, e.cfg.Names)
		return err
	}); err != nil {
		return fmt.Errorf("engine: loading records: %w", err)
	}
	names := make([]string, 0, len(recs))
	for name, r := range recs {
		e.placed.observe(r)
		names = append(names, name)
	}
	var imagesKV jetstream.KeyValue
	if err := jsetup.RetryStartup(ctx, e.log, "the images bucket", func(sctx context.Context) (err error) {
		imagesKV, err = e.cfg.JS.KeyValue(sctx, e.cfg.Names.ImagesBucket())
		return err
	}); err != nil {
		return fmt.Errorf("engine: opening %s: %w", e.cfg.Names.ImagesBucket(), err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return e.hosts.Run(gctx, hostsKV) })
	g.Go(func() error { return e.images.run(gctx, imagesKV) })
	g.Go(func() error { return e.proj.Run(gctx) })
	for _, ready := range []<-chan struct{}{e.hosts.Ready(), e.images.Ready()} {
		select {
		case <-ready:
		case <-gctx.Done():
			return g.Wait()
		}
	}
	g.Go(func() error { return e.runHostEvents(gctx) })
	g.Go(func() error { return e.runHostConsumers(gctx) })
	g.Go(func() error { return e.runCommands(gctx) })
	g.Go(func() error {
		if err := e.requeueInFlight(gctx, names); err != nil || gctx.Err() != nil {
			return err
		}
		return e.finishPurges(gctx)
	})
	if e.cfg.RetainDestroyed > 0 {
		g.Go(func() error { return e.runRetention(gctx) })
	}
	return g.Wait()
}

func (e *Engine) runCommands(ctx context.Context) error {
	cons, err := jsetup.CreateConsumer(ctx, e.cfg.JS, e.log, e.cfg.Names.CommandsStream(), jetstream.ConsumerConfig{
		Durable:       e.cfg.Names.CommandConsumer(),
		Description:   "vmherd engines: decide each command once",
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       e.cfg.AckWait,
		MaxAckPending: 4 * e.cfg.Concurrency,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	})
	if err != nil {
		return fmt.Errorf("engine: creating command consumer: %w", err)
	}
	var overRate sync.WaitGroup
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		name, action, issuer, _ := e.cfg.Names.ParseCommandSubject(msg.Subject())
		// Over its issuer's rate, a command is rejected without waiting
		// behind the VM's other commands (a redelivery is decided as
		// usual: it may have been decided before).
		if md, err := msg.Metadata(); err == nil && md.NumDelivered == 1 && !e.limits.allow(issuer, time.Now()) {
			e.overRate <- struct{}{}
			overRate.Add(1)
			e.rejectOverRate(ctx, msg, name, action, issuer, func() { <-e.overRate; overRate.Done() })
			return
		}
		e.exec.Do(name, func() { e.handle(ctx, msg) })
	}, jsetup.PullOpts(2*e.cfg.Concurrency)...)
	if err != nil {
		return fmt.Errorf("engine: consuming commands: %w", err)
	}
	<-ctx.Done()
	cc.Drain()
	<-cc.Closed()
	e.exec.Wait()
	overRate.Wait()
	return nil
}

// rejection is a decision not to run a command.
type rejection struct{ reason string }

func (r *rejection) Error() string { return r.reason }

func reject(format string, args ...any) error {
	return &rejection{reason: fmt.Sprintf(format, args...)}
}

// handle decides one command. It acks only after the decision is stored; on
// an error it leaves the message for redelivery.
func (e *Engine) handle(ctx context.Context, msg jetstream.Msg) {
	e.settle(ctx, msg, func(dctx context.Context) error { return e.decide(dctx, msg) })
}

// settle runs decide with a deadline that outlives shutdown (drain), then
// acks the command, or leaves it for redelivery on an error.
func (e *Engine) settle(ctx context.Context, msg jetstream.Msg, decide func(context.Context) error) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := decide(dctx); err != nil {
		e.log.Warn("deciding command failed; it will be redelivered", "subject", msg.Subject(), "err", err)
		_ = msg.NakWithDelay(time.Second)
		return
	}
	_ = msg.Ack()
}

func (e *Engine) decide(ctx context.Context, msg jetstream.Msg) error {
	md, err := msg.Metadata()
	if err != nil {
		return err
	}
	name, action, issuer, shapeOK := e.cfg.Names.ParseCommandSubject(msg.Subject())
	// The body is parsed once here (checked and decoded together); only a
	// body that fails is peeked at again, for a command id to reject it under.
	cmd, act, perr := parse(action, msg.Data())
	if events.StoredByServer(msg.Headers()) {
		// The answer of someone's direct get, stored here by the server
		// (a reply subject on vm.cmd.>): nobody published it.
		perr = reject("not a published command: the server stored it as the answer of a request whose reply subject was %s", msg.Subject())
	}
	cmdID := commandID(cmd, msg, md.Sequence.Stream)
	base := api.Event{VM: name, CommandID: cmdID, Action: fsm.Action(action), Issuer: issuer}

	// The subject must name a valid VM; else the rejection goes to a
	// subject that cannot collide with a real VM.
	if err := api.ValidateName(name); err != nil || !shapeOK {
		if err == nil {
			err = fmt.Errorf("subject %q must be %s or %s", msg.Subject(), e.cfg.Names.Command("<vm>", "<action>"), e.cfg.Names.IssuedCommand("<vm>", "<action>", "<issuer>"))
		}
		return e.appendInvalid(ctx, base, fmt.Sprintf("vm name in subject: %v", err))
	}
	e.cfg.Metrics.Redelivered("engine", md.NumDelivered)
	// A command decided before (a crash between storing its decision and
	// its ack) is found by the decision's message id while the event
	// stream's duplicate window still holds it (see the Append below); an
	// older one by looking at the VM's events. The delivery count says
	// nothing reliable here: a server that crashed may have forgotten it.
	if time.Since(md.Timestamp) > e.dupWindow()/2 {
		prev, seq, err := e.alreadyDecided(ctx, name, cmdID, md.Timestamp)
		if err != nil {
			return err
		}
		if prev != nil {
			return e.follow(ctx, prev, seq)
		}
		// A decision removed by the VM's purge is not found: a command
		// sent before the purge was stored is refused (the name may be a
		// new VM's), never applied to what now has the name.
		pg, purged, err := events.LastPurge(ctx, e.store.Stream(), e.cfg.Names, name)
		if err != nil {
			return err
		}
		if perr == nil && purged && md.Timestamp.Before(pg.Time) {
			perr = reject("sent at %s, before vm %s was purged (at %s): its name may be another VM's now; send the command again if it is still wanted",
				md.Timestamp.UTC().Format(time.RFC3339), name, pg.Time.UTC().Format(time.RFC3339))
		}
	}
	if perr == nil && issuer != "" {
		if err := api.ValidateIdentity(issuer); err != nil {
			perr = reject("issuer in subject: %v", err)
		}
	}
	var atLeast uint64 // the VM's last event, after a failed append
	for attempt := 0; ; attempt++ {
		rec, err := e.state(ctx, name, atLeast)
		if err != nil {
			return err
		}
		ev := base
		ev.Time = time.Now().UTC()
		derr := perr
		if derr == nil {
			derr = e.adm.admit(rec, act, cmd, &ev)
		}
		if derr != nil {
			ev.Type = api.TypeRejected
			ev.State = rec.CurrentState()
			if ev.State == fsm.StateAbsent {
				ev.State = ""
			}
			ev.Reason = derr.Error()
			ev.Spec, ev.Backend, ev.TimeoutS = nil, "", 0
		}
		seq, dup, err := e.store.Append(ctx, &ev, rec.LastSeq, api.DecisionMsgID(name, ev.CommandID))
		if errors.Is(err, events.ErrConflict) && attempt < maxConflicts {
			// Someone else appended since the record's last event: decide
			// again on a record that includes the VM's newest event.
			if atLeast, err = e.store.LastSeq(ctx, name); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		if dup {
			// This command was decided before: the decision stored then
			// is the one that counts (this one was made on a record that
			// already folded it, and would be a rejection as in flight),
			// and what it asks for may not have happened yet.
			stored, err := e.storedDecision(ctx, name, cmdID, seq)
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				// Stored, then removed by a purge of the VM after it
				// (which needs the VM destroyed with nothing in flight):
				// decided and done. Only when that purge is there: a
				// server's copy that is behind may answer a direct get
				// with not found for a message it has yet to receive.
				pg, purged, perr := events.LastPurge(ctx, e.store.Stream(), e.cfg.Names, name)
				if perr != nil {
					return perr
				}
				if purged && pg.Seq > seq {
					e.log.Info("a redelivered command's decision was purged with its vm", "vm", name, "command_id", cmdID, "seq", seq, "purge_seq", pg.Seq)
					return nil
				}
			}
			if err != nil {
				return err
			}
			return e.follow(ctx, stored, seq)
		}
		// Its task (and a forget's results), before the command is acked.
		if err := e.follow(ctx, &ev, seq); err != nil {
			return err
		}
		e.cfg.Metrics.Decided(action, string(ev.Type), md.Timestamp)
		// The next decision on this VM (they are serial per VM) waits for
		// the projection to fold this one rather than fail its append.
		e.waitFolded(ctx, seq)
		e.log.Debug("decided", "vm", name, "action", action, "command_id", ev.CommandID, "type", ev.Type, "reason", ev.Reason, "seq", seq)
		return nil
	}
}

// maxConflicts bounds the decisions of one delivery that lose a race to
// another writer; the command is then redelivered.
const maxConflicts = 20

// dupWindow is the event stream's duplicate window.
func (e *Engine) dupWindow() time.Duration {
	if w := e.cfg.Settings.DuplicateWindow; w > 0 {
		return w
	}
	return jsetup.DefaultSettings.DuplicateWindow
}

// storedDecision reads the decision of cmdID stored at seq.
func (e *Engine) storedDecision(ctx context.Context, name, cmdID string, seq uint64) (*api.Event, error) {
	m, err := e.store.Stream().GetMsg(ctx, seq)
	if err != nil {
		return nil, fmt.Errorf("reading the stored decision of command %s (vm %s, seq %d): %w", cmdID, name, seq, err)
	}
	ev, err := events.DecodeStored(e.cfg.Names, m.Subject, m.Data)
	if err == nil && events.RelayedCopy(m) {
		err = errors.New("stored by the server on a client's behalf, not by an engine")
	}
	if err != nil {
		return nil, fmt.Errorf("reading the stored decision of command %s (vm %s, seq %d): %w", cmdID, name, seq, err)
	}
	if ev.VM != name || ev.CommandID != cmdID || (ev.Type != api.TypeAccepted && ev.Type != api.TypeRejected) {
		return nil, fmt.Errorf("the event at seq %d is not the decision of command %s of vm %s", seq, cmdID, name)
	}
	return ev, nil
}

// commandID is the body's command_id, else the Nats-Msg-Id, else
// cmd-<seq>. cmd is the parsed body, nil if it did not parse.
func commandID(cmd *api.Command, msg jetstream.Msg, seq uint64) string {
	if cmd != nil && cmd.CommandID != "" {
		return cmd.CommandID // the schema checked it
	}
	var peek struct {
		CommandID string `json:"command_id"`
	}
	if cmd == nil && json.Unmarshal(msg.Data(), &peek) == nil && validCommandID(peek.CommandID) {
		return peek.CommandID
	}
	if id := msg.Headers().Get("Nats-Msg-Id"); validCommandID(id) {
		return id
	}
	return fmt.Sprintf("cmd-%d", seq)
}

// validCommandID: 1..128 printable characters without whitespace (the
// schemas' rule).
func validCommandID(id string) bool {
	if id == "" || len(id) > 128 || !utf8.ValidString(id) {
		return false
	}
	for _, r := range id {
		if unicode.IsSpace(r) || unicode.IsControl(r) {
			return false
		}
	}
	return true
}

// parse validates the body against the action's schema and decodes it,
// in one parse (schemas.DecodeCommand).
func parse(action string, data []byte) (*api.Command, fsm.Action, error) {
	act, err := api.ParseAction(action)
	if err != nil {
		return nil, "", reject("%v", err)
	}
	if len(data) > schemas.MaxBodySize {
		return nil, act, reject("body: %d bytes is too large (at most %d)", len(data), schemas.MaxBodySize)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		data = []byte("{}") // `nats pub vm.cmd.web1.start ""` means no options
	}
	var cmd api.Command
	if err := schemas.DecodeCommand(action, data, &cmd); err != nil {
		return nil, act, reject("%v", err)
	}
	return &cmd, act, nil
}

// appendInvalid records the rejection of a command whose subject names no
// valid VM.
func (e *Engine) appendInvalid(ctx context.Context, ev api.Event, reason string) error {
	raw := ev.VM
	ev.VM = api.InvalidVM
	ev.Type = api.TypeRejected
	ev.Reason = reason
	ev.Time = time.Now().UTC()
	body := ev
	body.VM = raw
	return e.store.AppendInvalid(ctx, &body, api.DecisionMsgID(api.InvalidVM, raw+"/"+string(ev.Action)+"/"+ev.CommandID))
}

// alreadyDecided looks for a decision of this command among the VM's
// decisions stored since it was published (less a minute of clock skew)
// and returns it with its sequence, or nil. It reads through a consumer
// of its own, deleted when done (its inactive threshold is the
// backstop), and reads exactly as many decisions as the consumer had
// pending when it was created, so a slow first fetch cannot end the look
// early.
func (e *Engine) alreadyDecided(ctx context.Context, name, cmdID string, published time.Time) (*api.Event, uint64, error) {
	st := e.store.Stream()
	cons, err := st.CreateConsumer(ctx, jetstream.ConsumerConfig{
		Description: "vmherd engine: earlier decision of one command",
		FilterSubjects: []string{
			e.cfg.Names.Event(name, api.TypeAccepted, api.EngineWriter),
			e.cfg.Names.Event(name, api.TypeRejected, api.EngineWriter),
		},
		DeliverPolicy:     jetstream.DeliverByStartTimePolicy,
		OptStartTime:      ptr(published.Add(-time.Minute)),
		AckPolicy:         jetstream.AckNonePolicy,
		InactiveThreshold: lookInactive,
		MemoryStorage:     true,
	})
	if err != nil {
		return nil, 0, fmt.Errorf("looking for an earlier decision of command %s: %w", cmdID, err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = st.DeleteConsumer(dctx, cons.CachedInfo().Name)
	}()
	pending := cons.CachedInfo().NumPending
	for read := uint64(0); read < pending; {
		batch, err := cons.Fetch(int(min(pending-read, 256)), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return nil, 0, err
		}
		n := 0
		for m := range batch.Messages() {
			n++
			md, err := m.Metadata()
			if err != nil {
				return nil, 0, err
			}
			if ev, err := events.DecodeStored(e.cfg.Names, m.Subject(), m.Data()); err == nil && ev.CommandID == cmdID && !events.StoredByServer(m.Headers()) {
				return ev, md.Sequence.Stream, nil
			}
		}
		if err := batch.Error(); err != nil {
			return nil, 0, err
		}
		if n == 0 {
			return nil, 0, fmt.Errorf("looking for an earlier decision of command %s: read %d of %d decisions, then none came", cmdID, read, pending)
		}
		read += uint64(n)
	}
	return nil, 0, nil
}

// lookInactive is the inactive threshold of a look-up's own consumer.
const lookInactive = 30 * time.Second

func ptr[T any](v T) *T { return &v }

// state returns the VM's decision state: the projection's record of it
// (the projector's fold, or the bucket's record of a VM it has not seen
// since it started). It is optimistic: the append that follows a decision
// expects the VM's last event to be the record's, and fails if anything
// was appended since, so a stale record costs a retry, never a wrong
// decision. After such a failure atLeast is the VM's last event: the
// projection is waited for (briefly) until it has folded it, and if its
// record still ends before it (a name with only rejections or
// observations has no record in the bucket, so after a restart the
// projector has none either), the VM's events are read from the stream
// itself and folded onto it.
func (e *Engine) state(ctx context.Context, name string, atLeast uint64) (*api.VmRecord, error) {
	if atLeast > 0 {
		wctx, cancel := context.WithTimeout(ctx, catchUpWait)
		e.proj.WaitFolded(wctx, atLeast)
		cancel()
	}
	rec, err := e.proj.Get(ctx, name)
	if err != nil {
		return nil, err
	}
	if rec == nil {
		rec = &api.VmRecord{Name: name, State: fsm.StateAbsent}
	}
	if rec.LastSeq < atLeast {
		from := rec.LastSeq
		evs, err := e.store.ReadVM(ctx, name, from+1)
		if err != nil {
			return nil, err
		}
		rec = projection.FoldStored(rec, evs)
		e.log.Info("the projection's record ends before the vm's last event; folded the rest from the stream",
			"vm", name, "record_seq", from, "last_seq", atLeast, "read", len(evs), "now", rec.LastSeq)
		e.proj.Seed(name, rec)
	}
	return rec, nil
}

// waitFolded waits briefly for the projection to fold seq, so the VM's
// next decision starts from it; if it does not, that decision's append
// fails and it catches up then.
func (e *Engine) waitFolded(ctx context.Context, seq uint64) {
	wctx, cancel := context.WithTimeout(ctx, projectionWait)
	defer cancel()
	e.proj.WaitFolded(wctx, seq)
}

// projectionWait bounds how long a decision waits for the projection to
// fold its own event; catchUpWait how long one that lost a race waits for
// the projection to fold the VM's newest event before reading it from the
// stream itself.
const (
	projectionWait = 100 * time.Millisecond
	catchUpWait    = 2 * time.Second
)

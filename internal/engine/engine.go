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
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/keyed"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/vm"
	"github.com/vmherd/vmherd/schemas"
)

// InvalidVM is the subject token used for events about commands whose VM
// name is not valid; the event's vm field holds the raw name.
const InvalidVM = "_invalid"

// Config of an engine.
type Config struct {
	JS       jetstream.JetStream
	Names    events.Names
	Settings events.Settings
	Log      *slog.Logger
	// ID names this engine's own consumers (the projection); unique per engine.
	ID string
	// HostLostAfter: a host that has not heartbeated for this long is lost.
	HostLostAfter time.Duration
	// Concurrency bounds the commands decided at once (across VMs).
	Concurrency int
	// AckWait of the command consumer.
	AckWait time.Duration
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

	mu sync.Mutex
	// cache holds the decision state of the VMs for which this engine knows
	// more than its projection: its own decisions the projection has not
	// folded yet, and VMs found stale by a failed append. Every other VM is
	// decided on the projection's record (see state).
	cache map[string]*decisionState
	// dispatched holds the accepted events this engine is appending or has
	// published the task of, so the dispatcher need not publish them again.
	dispatched map[string]*dispatchState
	runCtx     context.Context // the dispatcher's, for tasks it takes over
}

// New builds an engine. Streams and buckets must exist (events.Ensure).
func New(ctx context.Context, cfg Config) (*Engine, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.HostLostAfter == 0 {
		cfg.HostLostAfter = events.DefaultSettings.HostTTL
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
	st, err := events.NewStore(ctx, cfg.JS, cfg.Names)
	if err != nil {
		return nil, err
	}
	e := &Engine{
		cfg:        cfg,
		log:        cfg.Log.With("part", "engine", "engine", cfg.ID),
		store:      st,
		hosts:      hosts.NewRegistry(cfg.HostLostAfter),
		exec:       keyed.New(cfg.Concurrency),
		cache:      map[string]*decisionState{},
		dispatched: map[string]*dispatchState{},
	}
	e.proj = &projection.Projector{JS: cfg.JS, Names: cfg.Names, Log: e.log, Observe: e.observe}
	if cfg.StateDir != "" {
		e.proj.Checkpoint = filepath.Join(cfg.StateDir, "projection-"+cfg.ID+".seq")
	}
	return e, nil
}

// Hosts is the engine's view of the workers.
func (e *Engine) Hosts() *hosts.Registry { return e.hosts }

// Projector is the engine's projection.
func (e *Engine) Projector() *projection.Projector { return e.proj }

// Run serves until ctx ends, then stops taking commands and waits for the
// ones in progress to be decided (drain) before returning.
func (e *Engine) Run(ctx context.Context) error {
	hostsKV, err := e.cfg.JS.KeyValue(ctx, e.cfg.Names.HostsBucket())
	if err != nil {
		return fmt.Errorf("engine: opening %s: %w", e.cfg.Names.HostsBucket(), err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return e.hosts.Run(gctx, hostsKV) })
	g.Go(func() error { return e.proj.Run(gctx) })
	select {
	case <-e.hosts.Ready():
	case <-gctx.Done():
		return g.Wait()
	}
	g.Go(func() error { return e.runDispatcher(gctx) })
	g.Go(func() error { return e.runCommands(gctx) })
	return g.Wait()
}

func (e *Engine) runCommands(ctx context.Context) error {
	cons, err := events.CreateConsumer(ctx, e.cfg.JS, e.log, e.cfg.Names.CommandsStream(), jetstream.ConsumerConfig{
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
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		name, _, _ := e.cfg.Names.ParseCommandSubject(msg.Subject())
		e.exec.Do(name, func() { e.handle(ctx, msg) })
	}, jetstream.PullMaxMessages(2*e.cfg.Concurrency))
	if err != nil {
		return fmt.Errorf("engine: consuming commands: %w", err)
	}
	<-ctx.Done()
	cc.Drain()
	<-cc.Closed()
	e.exec.Wait()
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
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := e.decide(dctx, msg); err != nil {
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
	name, action, shapeOK := e.cfg.Names.ParseCommandSubject(msg.Subject())
	cmdID := commandID(msg, md.Sequence.Stream)
	base := events.Event{VM: name, CommandID: cmdID, Action: action}

	// The subject must name a valid VM; else the rejection goes to a
	// subject that cannot collide with a real VM.
	if err := vm.ValidateName(name); err != nil || !shapeOK {
		if err == nil {
			err = fmt.Errorf("subject %q must be %s", msg.Subject(), e.cfg.Names.Command("<vm>", "<action>"))
		}
		return e.appendInvalid(ctx, base, fmt.Sprintf("vm name in subject: %v", err))
	}
	if md.NumDelivered > 1 {
		done, err := e.alreadyDecided(ctx, name, cmdID, md.Timestamp)
		if err != nil || done {
			return err
		}
	}
	cmd, act, perr := parse(action, msg.Data())
	if cmd != nil && cmd.CommandID != "" {
		base.CommandID = cmd.CommandID
	}
	for attempt := 0; ; attempt++ {
		rec, err := e.state(ctx, name)
		if err != nil {
			return err
		}
		ev := base
		ev.Time = time.Now().UTC()
		derr := perr
		if derr == nil {
			derr = e.admit(rec, act, cmd, &ev)
		}
		if derr != nil {
			ev.Type = events.TypeRejected
			ev.State = rec.CurrentState()
			if ev.State == fsm.StateAbsent {
				ev.State = ""
			}
			ev.Reason = derr.Error()
			ev.Spec, ev.Backend, ev.TimeoutS = nil, "", 0
		}
		dkey := dispatchKey(name, ev.CommandID)
		if ev.Type == events.TypeAccepted {
			e.dispatchBegin(dkey)
		}
		seq, dup, err := e.store.Append(ctx, &ev, rec.LastSeq, events.DecisionMsgID(name, ev.CommandID))
		if ev.Type == events.TypeAccepted && (err != nil || dup) {
			e.dispatchEnd(dkey, false)
		}
		if errors.Is(err, events.ErrConflict) && attempt < 20 {
			e.invalidate(name, rec)
			continue
		}
		if err != nil {
			return err
		}
		if dup {
			return nil // decided before (a duplicate publish of the same command)
		}
		e.remember(name, projection.Fold(rec, &ev, seq))
		if ev.Type == events.TypeAccepted {
			err := e.publishTask(ctx, &ev, seq)
			e.dispatchEnd(dkey, err == nil)
			if err != nil {
				// The dispatcher will publish it from the accepted event.
				e.log.Warn("publishing task failed; the dispatcher will retry", "vm", name, "err", err)
			}
		}
		e.log.Debug("decided", "vm", name, "action", action, "type", ev.Type, "reason", ev.Reason, "seq", seq)
		return nil
	}
}

// commandID is the body's command_id, else the Nats-Msg-Id, else cmd-<seq>.
func commandID(msg jetstream.Msg, seq uint64) string {
	var peek struct {
		CommandID string `json:"command_id"`
	}
	if json.Unmarshal(msg.Data(), &peek) == nil && validCommandID(peek.CommandID) {
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

// parse validates the body against the action's schema and decodes it.
func parse(action string, data []byte) (*events.Command, fsm.Action, error) {
	act, err := fsm.ParseAction(action)
	if err != nil {
		return nil, "", reject("%v", err)
	}
	if len(data) > schemas.MaxBodySize {
		return nil, act, reject("body: %d bytes is too large (at most %d)", len(data), schemas.MaxBodySize)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		data = []byte("{}") // `nats pub vm.cmd.web1.start ""` means no options
	}
	if err := schemas.ValidateCommand(action, data); err != nil {
		return nil, act, reject("%v", err)
	}
	var cmd events.Command
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cmd); err != nil {
		return nil, act, reject("body: %v", err)
	}
	return &cmd, act, nil
}

// admit runs the state machine and placement. On accept it fills ev.
func (e *Engine) admit(rec *projection.VmRecord, act fsm.Action, cmd *events.Command, ev *events.Event) error {
	cur := rec.CurrentState()
	host, backend := rec.Host, rec.Backend
	if act == fsm.ActPrepare {
		spec := cmd.Spec.WithDefaults()
		if spec.Name == "" {
			spec.Name = ev.VM
		}
		if spec.Name != ev.VM {
			return reject("spec.name: %q must match the vm in the subject (%q)", spec.Name, ev.VM)
		}
		if _, err := fsm.Decide(cur, act); err != nil {
			return err
		}
		hb, err := e.place(cmd.Host, spec.Backend)
		if err != nil {
			return err
		}
		if spec.Backend == "" {
			spec.Backend = hb.DefaultBackend
		}
		spec = spec.WithDefaults() // the network default depends on the backend
		if err := spec.Validate(); err != nil {
			return err
		}
		host, backend = hb.Host, spec.Backend
		ev.Spec = &spec
	} else if rec.Exists() && cur != vm.StateDestroyed {
		if _, err := fsm.Decide(cur, act); err != nil {
			return err
		}
		hb, alive := e.hosts.Get(host)
		if !alive {
			return reject("host %s of vm %s is lost (no heartbeat for over %s); %s is rejected until its worker is back", host, ev.VM, e.cfg.HostLostAfter, act)
		}
		if !hb.Can(backend, string(act)) {
			return reject("backend %s cannot %s (not supported by the backend on host %s)", backend, act, host)
		}
	}
	next, err := fsm.Decide(cur, act)
	if err != nil {
		return err
	}
	ev.Type = events.TypeAccepted
	ev.State = next
	ev.Host = host
	ev.Backend = backend
	ev.Handle = rec.Handle
	if cmd.TimeoutS > 0 {
		ev.TimeoutS = cmd.TimeoutS
	}
	return nil
}

func (e *Engine) place(pin string, b vm.BackendTag) (*hosts.Heartbeat, error) {
	if pin != "" {
		hb, alive := e.hosts.Get(pin)
		if hb == nil {
			return nil, reject("host: %q is not a known host (alive hosts: %s)", pin, e.aliveList())
		}
		if !alive {
			return nil, reject("host: %q is not alive (no heartbeat for over %s)", pin, e.cfg.HostLostAfter)
		}
		if b != "" && !hb.Has(b) {
			return nil, reject("host: %q has no %s backend (it has %v)", pin, b, hb.Backends)
		}
		return hb, nil
	}
	hb, err := e.hosts.Place(b)
	if err != nil {
		return nil, reject("placement: %v", err)
	}
	return hb, nil
}

func (e *Engine) aliveList() string {
	var names []string
	for _, hb := range e.hosts.Alive() {
		names = append(names, hb.Host)
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

// appendInvalid records the rejection of a command whose subject names no
// valid VM.
func (e *Engine) appendInvalid(ctx context.Context, ev events.Event, reason string) error {
	raw := ev.VM
	ev.VM = InvalidVM
	ev.Type = events.TypeRejected
	ev.Reason = reason
	ev.Time = time.Now().UTC()
	body := ev
	body.VM = raw
	_, err := e.cfg.JS.Publish(ctx, e.cfg.Names.Event(InvalidVM, events.TypeRejected), body.Encode(),
		jetstream.WithMsgID(events.DecisionMsgID(InvalidVM, raw+"/"+ev.Action+"/"+ev.CommandID)))
	return err
}

// alreadyDecided looks for a decision of this command among the VM's
// events since it was published (a redelivery after a crash between the
// append and the ack).
func (e *Engine) alreadyDecided(ctx context.Context, name, cmdID string, published time.Time) (bool, error) {
	cons, err := e.store.Stream().OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{e.cfg.Names.Event(name, events.TypeAccepted), e.cfg.Names.Event(name, events.TypeRejected)},
		DeliverPolicy:  jetstream.DeliverByStartTimePolicy,
		OptStartTime:   ptr(published.Add(-time.Minute)),
	})
	if err != nil {
		return false, err
	}
	for {
		batch, err := cons.FetchNoWait(256)
		if err != nil {
			return false, err
		}
		n := 0
		for m := range batch.Messages() {
			n++
			if ev, err := events.Decode(m.Data()); err == nil && ev.CommandID == cmdID {
				return true, nil
			}
		}
		if batch.Error() != nil {
			return false, batch.Error()
		}
		if n == 0 {
			return false, nil
		}
	}
}

func ptr[T any](v T) *T { return &v }

// state returns the VM's decision state, a fold of a prefix of its events:
// this engine's own fold if it is ahead of the projection, else the
// projection's (which folds every event, whoever wrote it, in order). Both
// are optimistic: the append that follows a decision expects the VM's
// last event to be the state's, and fails if anything was appended since,
// so a stale state costs a retry, never a wrong decision. After such a
// failure (invalidate) the state is caught up from the stream.
func (e *Engine) state(ctx context.Context, name string) (*projection.VmRecord, error) {
	e.mu.Lock()
	c := e.cache[name]
	e.mu.Unlock()
	p := e.proj.Current(name)
	var rec *projection.VmRecord
	if c != nil {
		rec = c.rec
	}
	if p != nil && (rec == nil || p.LastSeq > rec.LastSeq) {
		rec = p
	}
	if c == nil || c.fresh {
		if rec == nil {
			// Unknown to this engine: most likely a new VM. If it is not,
			// the append fails and the next attempt reads the stream.
			rec = &projection.VmRecord{Name: name, State: fsm.StateAbsent}
		}
		return rec, nil
	}
	if rec.LastSeq == 0 {
		kv, err := e.cfg.JS.KeyValue(ctx, e.cfg.Names.RecordsBucket())
		if err != nil {
			return nil, err
		}
		if ent, err := kv.Get(ctx, name); err == nil {
			if r, err := projection.Unmarshal(ent.Value()); err == nil {
				rec = r
			}
		} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil, err
		}
	}
	// The projection folds every event: if it has reached the VM's last
	// one (or does so shortly; it is usually a few events behind), its
	// record is complete, and the stream need not be read.
	last, err := e.store.LastSeq(ctx, name)
	if err != nil {
		return nil, err
	}
	if rec.LastSeq < last {
		wctx, cancel := context.WithTimeout(ctx, projectionWait)
		if e.proj.WaitFolded(wctx, last) {
			if p := e.proj.Current(name); p != nil && p.LastSeq > rec.LastSeq {
				rec = p
			}
		}
		cancel()
	}
	if rec.LastSeq >= last {
		e.remember(name, rec)
		return rec, nil
	}
	evs, err := e.store.ReadVM(ctx, name, rec.LastSeq+1)
	if err != nil {
		return nil, err
	}
	for _, s := range evs {
		rec = projection.Fold(rec, s.Event, s.Seq)
	}
	e.remember(name, rec)
	return rec, nil
}

// projectionWait bounds how long a decision waits for the projection to
// fold a VM's latest events before reading them from the stream itself.
const projectionWait = 100 * time.Millisecond

// decisionState is the engine's fold of one VM; fresh is false once an
// append found that someone else wrote to the VM since.
type decisionState struct {
	rec   *projection.VmRecord
	fresh bool
}

// remember keeps a fold that is ahead of the projection's.
func (e *Engine) remember(name string, rec *projection.VmRecord) {
	if p := e.proj.Current(name); p != nil && p.LastSeq >= rec.LastSeq {
		e.mu.Lock()
		delete(e.cache, name)
		e.mu.Unlock()
		return
	}
	e.mu.Lock()
	e.cache[name] = &decisionState{rec: rec, fresh: true}
	e.mu.Unlock()
}

// invalidate makes the next decision catch up from the stream, starting
// from rec, the prefix of the VM's events the failed decision was on.
func (e *Engine) invalidate(name string, rec *projection.VmRecord) {
	e.mu.Lock()
	if c := e.cache[name]; c != nil && c.rec.LastSeq >= rec.LastSeq {
		c.fresh = false
	} else {
		e.cache[name] = &decisionState{rec: rec, fresh: false}
	}
	e.mu.Unlock()
}

// observe is the projection's report of its new fold of a VM: once it has
// caught up with this engine's own, the engine's copy goes.
func (e *Engine) observe(name string, rec *projection.VmRecord) {
	e.mu.Lock()
	if c := e.cache[name]; c != nil && (rec.LastSeq > c.rec.LastSeq || c.fresh && rec.LastSeq == c.rec.LastSeq) {
		delete(e.cache, name)
	}
	e.mu.Unlock()
}

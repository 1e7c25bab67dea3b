// Package worker runs backend calls for the VMs placed on one host. It
// consumes only its host's tasks, emits exactly one result event per
// command, heartbeats its capacity, answers live queries, and watches its
// VMs for drift.
package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/images"
	"github.com/vmherd/vmherd/internal/keyed"
	"github.com/vmherd/vmherd/internal/metrics"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/relay"
)

// Version is reported in heartbeats and the micro service.
var Version = "0.1.0"

// JetStream is what a worker needs of a JetStream context (a
// jetstream.JetStream has it): its host's task consumer, the records,
// hosts and images buckets, and the event stream with publishes
// (events.Store). It never creates streams or consumers.
type JetStream interface {
	events.StoreJS
	events.KVReader
	Consumer(ctx context.Context, stream, consumer string) (jetstream.Consumer, error)
	KeyValue(ctx context.Context, bucket string) (jetstream.KeyValue, error)
}

// Config of a worker.
type Config struct {
	NC     *nats.Conn
	JS     JetStream
	Names  api.Names
	Host   string
	Router *backends.Router
	Log    *slog.Logger
	// Capacity offered to placement (default: this machine's CPUs and memory).
	Capacity api.Resources
	// HeartbeatEvery: how often the worker writes VM_HOSTS (default 2s).
	HeartbeatEvery time.Duration
	// AckWait of the task consumer; long calls signal progress every third of it.
	AckWait time.Duration
	// Concurrency bounds the backend calls run at once (across VMs).
	Concurrency int
	// ReconcileEvery: how often running VMs are checked against the backend.
	ReconcileEvery time.Duration
	// DefaultStopTimeout is used when a stop command has no timeout_s.
	DefaultStopTimeout time.Duration
	// CallTimeout bounds other backend calls.
	CallTimeout time.Duration
	// Metrics, if set, records backend calls, task latencies and redeliveries.
	Metrics *metrics.Set
	// ImageRoots are the directories a spec's image_path must resolve into
	// (--image-dir); none allows no image. VMDirs are the VMs' work
	// directories, which an image path must never resolve into.
	ImageRoots []string
	VMDirs     []string
	// ImageStore is where `vmctl image pull` keeps images (package
	// images; one of ImageRoots); "" serves no image requests.
	ImageStore string
	// ImagePolicy bounds pulls: destinations, size, time (--image-*).
	ImagePolicy images.Policy
	// RelayLimits bound the tunnels to this host's guests (--tunnels,
	// --tunnels-per-identity; zero: the defaults).
	RelayLimits relay.Limits
	// Migration: where this host takes migration traffic, and its bounds.
	Migration MigrationConfig
}

// eventLog is what a worker needs of the event store (an *events.Store
// has it): append its results and observations, read a VM's events after
// a sequence, and the stream for a VM's last event. Tests put a fake in
// front of the store here.
type eventLog interface {
	Append(ctx context.Context, ev *api.Event, expect uint64, msgID string) (seq uint64, dup bool, err error)
	ReadVM(ctx context.Context, vmName string, from uint64) ([]events.Stored, error)
	Stream() jetstream.Stream
}

var _ eventLog = (*events.Store)(nil)

// local is what the worker knows of one of its VMs.
type local struct {
	handle api.VmHandle
	state  api.VmState
	spec   *api.VmSpec
}

// Worker runs one host's tasks.
type Worker struct {
	cfg   Config
	log   *slog.Logger
	store eventLog
	exec  *keyed.Serial
	// relay serves the consoles, logs and tunnels of this host's VMs.
	relay *relay.Server

	mu  sync.Mutex
	vms map[string]*local
	// calls are the backend calls running now, by VM, so a destroy can
	// cut a stop short (cutShort).
	calls map[string]*runningCall
	// digests remembers base images' sha256 (baseDigest).
	digests map[string]string

	// kill aborts backend calls without writing results (a simulated crash).
	killCtx context.Context
	kill    context.CancelFunc
}

// New builds a worker. Streams and buckets must exist (jsetup.Ensure).
func New(ctx context.Context, cfg Config) (*Worker, error) {
	if err := api.ValidateHost(cfg.Host); err != nil {
		return nil, fmt.Errorf("worker: --host: %w", err)
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.HeartbeatEvery == 0 {
		cfg.HeartbeatEvery = 2 * time.Second
	}
	if cfg.AckWait == 0 {
		cfg.AckWait = 30 * time.Second
	}
	if cfg.Concurrency == 0 {
		cfg.Concurrency = 64
	}
	if cfg.ReconcileEvery == 0 {
		cfg.ReconcileEvery = 10 * time.Second
	}
	if cfg.DefaultStopTimeout == 0 {
		cfg.DefaultStopTimeout = 30 * time.Second
	}
	if cfg.CallTimeout == 0 {
		cfg.CallTimeout = 10 * time.Minute
	}
	if cfg.Capacity.Vcpus == 0 {
		cfg.Capacity.Vcpus = 4 * runtime.NumCPU() // a 4:1 CPU overcommit
	}
	if cfg.Capacity.MemoryMB == 0 {
		cfg.Capacity.MemoryMB = hostMemoryMB()
	}
	st, err := events.NewStore(ctx, cfg.JS, cfg.Names, cfg.Host)
	if err != nil {
		return nil, err
	}
	w := &Worker{
		cfg:     cfg,
		log:     cfg.Log.With("part", "worker", "host", cfg.Host),
		store:   st,
		exec:    keyed.New(cfg.Concurrency),
		vms:     map[string]*local{},
		calls:   map[string]*runningCall{},
		digests: map[string]string{},
	}
	w.cfg.Migration.defaults()
	w.killCtx, w.kill = context.WithCancel(context.Background())
	return w, nil
}

// Kill aborts every backend call in progress without recording results, as
// if the process had died. Tests use it to prove redelivery.
func (w *Worker) Kill() { w.kill() }

// Run serves until ctx ends, then stops taking tasks and lets the calls in
// progress finish and record their results (drain).
func (w *Worker) Run(ctx context.Context) error {
	if err := w.adopt(ctx); err != nil {
		if ctx.Err() != nil {
			return nil // asked to stop while starting: not a failure
		}
		return err
	}
	svc, err := w.startQueries()
	if err != nil {
		return err
	}
	defer func() { _ = svc.Stop() }()
	defer w.relay.Close()
	imgs, err := w.startImages(ctx, svc)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	defer imgs.stop()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return w.heartbeat(gctx) })
	g.Go(func() error { return w.watchExits(gctx) })
	g.Go(func() error { return w.reconcileLoop(gctx) })
	g.Go(func() error { return w.consumeTasks(gctx) })
	err = g.Wait()
	w.exec.Wait()
	return err
}

func (w *Worker) consumeTasks(ctx context.Context) error {
	cons, err := w.taskConsumer(ctx)
	if err != nil {
		if ctx.Err() != nil || w.killCtx.Err() != nil {
			return nil
		}
		return fmt.Errorf("worker: binding the task consumer: %w", err)
	}
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		if events.StoredByServer(msg.Headers()) {
			// The answer of someone's request whose reply subject was a
			// task subject, stored by the server: no engine queued it.
			w.log.Error("dropping a task no engine queued (stored by the server as a reply)", "subject", msg.Subject())
			_ = msg.Term()
			return
		}
		var t events.Task
		if err := json.Unmarshal(msg.Data(), &t); err != nil || t.VM == "" {
			w.log.Error("dropping undecodable task", "subject", msg.Subject(), "err", err)
			_ = msg.Term()
			return
		}
		if t.Action == fsm.ActDestroy {
			// Queued behind the VM's call in flight: if that is a stop
			// waiting for a guest that ignores it, end the wait now.
			w.cutShort(&t)
		}
		w.exec.Do(t.VM, func() { w.runTask(msg, &t) })
	}, jsetup.PullOpts(2*w.cfg.Concurrency)...)
	if err != nil {
		return fmt.Errorf("worker: consuming tasks: %w", err)
	}
	select {
	case <-ctx.Done():
	case <-w.killCtx.Done():
	}
	cc.Drain()
	<-cc.Closed()
	return nil
}

// taskConsumer waits until the host's task consumer exists and has the
// worker's ack wait: the engines create it (and update it) from the
// worker's heartbeat; a worker never creates consumers.
func (w *Worker) taskConsumer(ctx context.Context) (jetstream.Consumer, error) {
	name := w.cfg.Names.HostTaskConsumer(w.cfg.Host)
	logged := false
	for delay := 100 * time.Millisecond; ; delay = min(2*delay, 2*time.Second) {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		cons, err := w.cfg.JS.Consumer(cctx, w.cfg.Names.TasksStream(), name)
		cancel()
		switch {
		case err == nil && cons.CachedInfo().Config.AckWait == w.cfg.AckWait:
			if logged {
				w.log.Info("task consumer ready", "consumer", name)
			}
			return cons, nil
		case err == nil:
			err = fmt.Errorf("it has ack wait %s, this worker asked for %s", cons.CachedInfo().Config.AckWait, w.cfg.AckWait)
		case !errors.Is(err, jetstream.ErrConsumerNotFound) && !jsetup.Transient(err):
			return nil, err
		}
		if !logged {
			w.log.Info("waiting for an engine to create or update this host's task consumer from its heartbeat", "consumer", name, "why", err)
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-w.killCtx.Done():
			return nil, w.killCtx.Err()
		case <-time.After(delay):
		}
	}
}

// runTask runs one backend call and records its result; it acks only after
// the result event is stored.
func (w *Worker) runTask(msg jetstream.Msg, t *events.Task) {
	if w.killCtx.Err() != nil {
		return // crashed: leave it for redelivery
	}
	log := w.log.With("vm", t.VM, "action", t.Action, "command_id", t.CommandID)
	if t.Host != w.cfg.Host {
		log.Error("task for another host on this host's subject; refusing it", "task_host", t.Host)
		_ = msg.Term()
		return
	}
	ctx := w.killCtx
	md, _ := msg.Metadata()
	if md != nil {
		w.cfg.Metrics.Redelivered("worker", md.NumDelivered)
	}
	if t.Fence {
		w.fence(msg, t, log)
		return
	}
	if t.Action == fsm.ActMigrate {
		// Each side reads the migrate's outcome itself (a redelivery
		// carries on from what is stored).
		w.migrate(msg, t, log)
		return
	}
	// A redelivered (or re-published) task whose result is already stored
	// must not run again.
	if prev, err := w.findResult(ctx, t); err != nil {
		log.Warn("checking for an earlier result failed; retrying later", "err", err)
		_ = msg.NakWithDelay(time.Second)
		return
	} else if prev != nil {
		w.note(prev)
		_ = msg.Ack()
		return
	}

	// Keep JetStream from redelivering a long call (a stop waits up to its timeout).
	stopProgress := w.progress(msg)
	callCtx, done := w.running(ctx, t)
	ev := w.call(callCtx, t)
	done()
	stopProgress()
	if w.killCtx.Err() != nil {
		return
	}
	if !w.appendUntilStored(ev, api.ResultMsgID(t.VM, t.CommandID), log) {
		return
	}
	if md != nil {
		w.cfg.Metrics.TaskDone(string(t.Action), string(ev.Type), md.Timestamp)
	}
	w.note(ev)
	_ = msg.Ack()
	log.Debug("task done", "result", ev.Type, "error", ev.Error)
}

// fence removes from this host a VM that was forgotten while the host was
// lost (its record already ends destroyed): it destroys the incarnation the
// forget named, whatever this worker believed of it, and reports `fenced`.
// A VM never runs twice under one name: the record, not a guess, says what
// to remove. A destroy that keeps failing is retried a few times, then
// reported with its error.
func (w *Worker) fence(msg jetstream.Msg, t *events.Task, log *slog.Logger) {
	h := w.handleFor(t)
	ctx, cancel := context.WithTimeout(w.killCtx, w.cfg.DefaultStopTimeout+2*time.Minute)
	err := w.cfg.Router.Destroy(ctx, h)
	cancel()
	if w.killCtx.Err() != nil {
		return
	}
	if err != nil {
		if md, merr := msg.Metadata(); merr == nil && md.NumDelivered < 5 {
			log.Warn("fencing a forgotten vm failed; retrying", "err", err)
			_ = msg.NakWithDelay(10 * time.Second)
			return
		}
	}
	ev := &api.Event{
		Type: api.TypeFenced, VM: t.VM, CommandID: t.CommandID, Action: t.Action, Time: time.Now().UTC(),
		Host: w.cfg.Host, Handle: t.Handle, AcceptedSeq: t.AcceptedSeq,
		Reason: "the vm was forgotten while this host was lost; its worker removed it on return",
	}
	if err != nil {
		ev.Error = fmt.Sprintf("destroy vm %s on host %s: %v", t.VM, w.cfg.Host, err)
	}
	if !w.appendUntilStored(ev, api.FencedMsgID(t.VM, t.CommandID), log) {
		return
	}
	w.mu.Lock()
	delete(w.vms, t.VM)
	w.mu.Unlock()
	_ = msg.Ack()
	log.Info("fenced a forgotten vm", "handle_id", h.ID, "error", ev.Error)
}

// appendUntilStored appends ev without a concurrency check, retrying until
// it is stored; false if the worker was killed first.
func (w *Worker) appendUntilStored(ev *api.Event, msgID string, log *slog.Logger) bool {
	for attempt := 0; ; attempt++ {
		actx, cancel := context.WithTimeout(w.killCtx, 10*time.Second)
		_, _, err := w.store.Append(actx, ev, events.NoExpect, msgID)
		cancel()
		if err == nil {
			return true
		}
		if w.killCtx.Err() != nil {
			return false
		}
		log.Warn("storing event failed; retrying", "type", ev.Type, "err", err, "attempt", attempt)
		time.Sleep(min(time.Duration(attempt+1)*200*time.Millisecond, 2*time.Second))
	}
}

// progress signals InProgress every third of the ack wait until stopped;
// once stop returns, no more is signalled (the task is acked next).
func (w *Worker) progress(msg jetstream.Msg) func() {
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(w.cfg.AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				_ = msg.InProgress()
			}
		}
	}()
	return sync.OnceFunc(func() {
		close(done)
		<-exited
	})
}

// call runs the backend call of a task and returns its result event.
func (w *Worker) call(ctx context.Context, t *events.Task) *api.Event {
	ev := &api.Event{
		VM: t.VM, CommandID: t.CommandID, Action: t.Action, Host: w.cfg.Host,
		AcceptedSeq: t.AcceptedSeq,
	}
	h := w.handleFor(t)
	timeout := w.cfg.CallTimeout
	stopTimeout := w.cfg.DefaultStopTimeout
	if t.TimeoutS > 0 {
		stopTimeout = time.Duration(t.TimeoutS) * time.Second
		if t.Action != fsm.ActStop {
			timeout = stopTimeout
		}
	}
	if t.Action == fsm.ActStop || t.Action == fsm.ActDestroy {
		timeout = stopTimeout + 2*time.Minute
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var err error
	r := w.cfg.Router
	began := time.Now()
	defer func() {
		b := t.Backend
		if b == "" {
			b = r.Default()
		}
		w.cfg.Metrics.BackendCall(string(b), string(t.Action), time.Since(began), err)
	}()
	switch t.Action {
	case fsm.ActPrepare:
		// A new incarnation: its handle is what Prepare returns, never
		// the previous one's the task carries.
		h = api.VmHandle{}
		if t.Spec == nil {
			err = errors.New("prepare task without a spec")
			break
		}
		spec := *t.Spec
		if spec.Backend == "" {
			spec.Backend = t.Backend
		}
		if spec.Image != "" {
			// The backend gets the file (the accepted event keeps the name).
			if spec.ImagePath, err = w.namedImage(spec); err != nil {
				break
			}
			spec.Image = ""
		}
		if spec.ImagePath != "" && r.LocalImages(spec.Backend) {
			if spec.ImagePath, err = w.checkImage(spec.ImagePath); err != nil {
				break
			}
		}
		h, err = r.Prepare(cctx, spec)
		ev.State = api.StatePrepared
	case fsm.ActStart:
		h, err = r.Start(cctx, h)
		ev.State = api.StateRunning
	case fsm.ActStop:
		h, err = r.Stop(cctx, h, stopTimeout)
		ev.State = api.StateStopped
	case fsm.ActSuspend:
		h, err = r.Suspend(cctx, h)
		ev.State = api.StateSuspended
	case fsm.ActResume:
		h, err = r.Resume(cctx, h)
		ev.State = api.StateRunning
	case fsm.ActDestroy:
		err = r.Destroy(cctx, h)
		ev.State = api.StateDestroyed
	default:
		err = fmt.Errorf("unknown action %q", t.Action)
	}
	ev.Time = time.Now().UTC()
	if h.ID != "" {
		// A handle without an id (destroying a VM whose prepare failed)
		// names no incarnation: the event carries none.
		h.Host = w.cfg.Host
		hc := h.Clone()
		ev.Handle = &hc
	}
	if err != nil {
		var cut *errCutShort
		if errors.As(context.Cause(ctx), &cut) {
			err = cut
		}
		ev.Type = api.TypeFailed
		ev.State = api.StateFailed
		ev.Error = fmt.Sprintf("%s vm %s on host %s: %v", t.Action, t.VM, w.cfg.Host, err)
		// A failed call keeps the incarnation's handle; a failed prepare
		// has none yet (the task's is the previous incarnation's).
		if ev.Handle == nil && t.Handle != nil && t.Handle.ID != "" && t.Action != fsm.ActPrepare {
			ev.Handle = t.Handle
		}
		return ev
	}
	ev.Type = api.ResultOf(t.Action)
	return ev
}

// runningCall is a backend call in progress for a VM.
type runningCall struct {
	action      fsm.Action
	acceptedSeq uint64
	cancel      context.CancelCauseFunc
}

// errCutShort is the cause of a stop ended early by a destroy accepted
// after it.
type errCutShort struct{ by string }

func (e *errCutShort) Error() string {
	return "cut short: destroy " + e.by + " was accepted while the stop waited for the guest to power off"
}

// running registers t's call for cutShort; done unregisters it.
func (w *Worker) running(ctx context.Context, t *events.Task) (context.Context, func()) {
	cctx, cancel := context.WithCancelCause(ctx)
	rc := &runningCall{action: t.Action, acceptedSeq: t.AcceptedSeq, cancel: cancel}
	w.mu.Lock()
	w.calls[t.VM] = rc
	w.mu.Unlock()
	return cctx, func() {
		w.mu.Lock()
		if w.calls[t.VM] == rc {
			delete(w.calls, t.VM)
		}
		w.mu.Unlock()
		cancel(nil)
	}
}

// cutShort ends the grace of a stop in progress for destroy task t's VM,
// when t was accepted after the stop: the stop's call is cancelled
// (QEMU then goes straight to SIGTERM and SIGKILL; a backend that
// returns the cancellation makes the stop's result a failure naming the
// destroy), and the destroy, queued behind it, runs at once. Without
// this a stop with a long timeout_s held the VM, and one of the worker's
// call slots, for its whole grace whatever came next (issue #26). A
// destroy redelivered from an earlier incarnation (a lower accepted
// sequence) cuts nothing.
func (w *Worker) cutShort(t *events.Task) {
	w.mu.Lock()
	rc := w.calls[t.VM]
	w.mu.Unlock()
	if rc == nil || rc.action != fsm.ActStop || t.AcceptedSeq <= rc.acceptedSeq {
		return
	}
	w.log.Info("a destroy cuts the stop in progress short", "vm", t.VM, "destroy", t.CommandID)
	rc.cancel(&errCutShort{by: t.CommandID})
}

// handleFor returns the handle to act on. The task carries the record's
// handle as of the decision, which already holds the result of every
// earlier command, except when destroy overtook a command still in flight:
// then the worker's own handle (from that command's result) is newer.
func (w *Worker) handleFor(t *events.Task) api.VmHandle {
	w.mu.Lock()
	var mine api.VmHandle
	if l, ok := w.vms[t.VM]; ok {
		mine = l.handle.Clone()
	}
	w.mu.Unlock()
	haveTask := t.Handle != nil && t.Handle.ID != ""
	if mine.Name != "" && (!haveTask || (t.Action == fsm.ActDestroy && t.Handle.ID == mine.ID)) {
		return mine
	}
	if t.Handle != nil && t.Handle.Name != "" {
		return t.Handle.Clone()
	}
	return api.VmHandle{Name: t.VM, Backend: t.Backend, Host: w.cfg.Host}
}

// note updates the worker's view of a VM from a result it stored or found.
func (w *Worker) note(ev *api.Event) {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case ev.Type == api.TypeDestroyed:
		delete(w.vms, ev.VM)
	case ev.Handle != nil:
		l := w.vms[ev.VM]
		if l == nil {
			l = &local{}
			w.vms[ev.VM] = l
		}
		l.handle = ev.Handle.Clone()
		if l.handle.Spec != nil {
			l.spec = l.handle.Spec
		}
		if ev.Type != api.TypeFailed {
			l.state = ev.State
		}
	}
}

// findResult returns the result already stored for the task's command, if any.
func (w *Worker) findResult(ctx context.Context, t *events.Task) (*api.Event, error) {
	evs, err := w.store.ReadVM(ctx, t.VM, t.AcceptedSeq+1)
	if err != nil {
		return nil, err
	}
	for _, s := range evs {
		// Only this host's worker or an engine (a forget's abandoned
		// commands) answers a command of this host; another host's
		// worker may write on its own subjects for any VM name.
		if s.Event != nil && s.Event.CommandID == t.CommandID && s.Event.Type.IsResult() &&
			(s.Event.FromEngine() || s.Event.Writer == w.cfg.Host) {
			return s.Event, nil
		}
	}
	return nil, nil
}

// adopt takes back the VMs the records place on this host, after a restart.
func (w *Worker) adopt(ctx context.Context) error {
	// Reading the records waits out a cluster still electing leaders;
	// adopting them has no deadline (a host may have many VMs).
	var recs map[string]*api.VmRecord
	if err := jsetup.RetryStartup(ctx, w.log, "the records, to re-adopt this host's VMs", func(sctx context.Context) (err error) {
		recs, err = projection.Load(sctx, w.cfg.JS, w.cfg.Names)
		return err
	}); err != nil {
		return fmt.Errorf("worker: loading records: %w", err)
	}
	for name, r := range recs {
		if r.Host != w.cfg.Host {
			continue
		}
		// The bucket's record may end before the VM's last event (an
		// engine that died with the server had not written it yet): the
		// rest is read from the stream, so a VM destroyed (or started)
		// since is not adopted as what the record said.
		evs, err := w.store.ReadVM(ctx, name, r.LastSeq+1)
		if err != nil {
			return fmt.Errorf("worker: reading the events of vm %s after its record: %w", name, err)
		}
		r = projection.FoldStored(r, evs)
		if r.Host != w.cfg.Host || r.Handle == nil || !r.Live() {
			continue
		}
		recorded := r.State
		h, st, err := w.cfg.Router.Adopt(ctx, *r.Handle, recorded)
		if err != nil {
			w.log.Warn("cannot adopt vm", "vm", name, "state", recorded, "err", err)
			continue
		}
		w.mu.Lock()
		w.vms[name] = &local{handle: h, state: st, spec: h.Spec}
		w.mu.Unlock()
		w.log.Info("adopted vm", "vm", name, "recorded", recorded, "actual", st)
		if (recorded == api.StateRunning || recorded == api.StateSuspended) && st == api.StateStopped {
			w.emitExit(ctx, backends.Exit{Handle: *r.Handle, Reason: "not running when the worker restarted"})
		}
	}
	return nil
}

func (w *Worker) watchExits(ctx context.Context) error {
	for ex := range w.cfg.Router.Watch(ctx) {
		w.exec.Do(ex.Handle.Name, func() { w.emitExit(ctx, ex) })
	}
	return nil
}

// emitExit records that a VM's process ended without a command, naming the
// incarnation (handle id and pid) it observed.
func (w *Worker) emitExit(ctx context.Context, ex backends.Exit) {
	if !w.stillCurrent(ctx, ex.Handle) {
		w.log.Debug("not recording exit of a superseded view", "vm", ex.Handle.Name, "pid", ex.Handle.PID)
		w.mu.Lock()
		delete(w.vms, ex.Handle.Name) // learn the current view again on the next task
		w.mu.Unlock()
		return
	}
	h := ex.Handle.Clone()
	h.Host = w.cfg.Host
	ev := &api.Event{
		Type: api.TypeExited, VM: h.Name, Time: time.Now().UTC(), Host: w.cfg.Host,
		State: api.StateStopped, Handle: &h, Reason: ex.Reason,
	}
	for attempt := 0; attempt < 50 && ctx.Err() == nil; attempt++ {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, _, err := w.store.Append(actx, ev, events.NoExpect, api.ExitMsgID(h.Name, h.ID, h.PID))
		cancel()
		if err == nil {
			break
		}
		w.log.Warn("recording exit failed; retrying", "vm", h.Name, "err", err)
		time.Sleep(time.Second)
	}
	w.mu.Lock()
	if l, ok := w.vms[h.Name]; ok && l.handle.ID == h.ID && l.handle.PID == h.PID {
		l.state = api.StateStopped
		l.handle.PID = 0
	}
	w.mu.Unlock()
	w.log.Info("vm exited without a command", "vm", h.Name, "pid", h.PID, "reason", ex.Reason)
}

// stillCurrent reports whether the VM's latest events say h is its current
// incarnation and running or suspended with no command in flight, so an
// exit observed on h is news. A worker's own view can be older than the
// stream (another worker of this host ran the last command, or the records
// it adopted from lagged).
func (w *Worker) stillCurrent(ctx context.Context, h api.VmHandle) bool {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	m, err := w.store.Stream().GetLastMsgForSubject(cctx, w.cfg.Names.VMEvents(h.Name))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false // no events: not a VM
	}
	if err != nil {
		return ctx.Err() == nil // cannot tell: report rather than lose a real exit
	}
	ev, err := events.Decode(m.Data)
	if err != nil {
		return true
	}
	running := func(st api.VmState) bool { return st == api.StateRunning || st == api.StateSuspended }
	same := func(o *api.VmHandle) bool { return o != nil && o.ID == h.ID && o.PID == h.PID }
	switch {
	case ev.Type == api.TypeAccepted:
		return false // a command is in flight; its result will say what happened
	case ev.Type == api.TypeRejected || ev.Handle == nil:
		rec, err := w.record(cctx, h.Name)
		if err != nil || rec == nil {
			return false
		}
		return same(rec.Handle) && running(rec.State) && len(rec.InFlight) == 0
	default:
		return same(ev.Handle) && running(ev.State)
	}
}

func (w *Worker) record(ctx context.Context, name string) (*api.VmRecord, error) {
	kv, err := w.cfg.JS.KeyValue(ctx, w.cfg.Names.RecordsBucket())
	if err != nil {
		return nil, err
	}
	e, err := kv.Get(ctx, name)
	if err != nil {
		return nil, err
	}
	return api.UnmarshalRecord(e.Value())
}

// reconcileLoop checks, on a timer, that VMs believed running still are.
func (w *Worker) reconcileLoop(ctx context.Context) error {
	t := time.NewTicker(w.cfg.ReconcileEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			w.Reconcile(ctx)
		}
	}
}

// Reconcile compares every VM believed running or suspended with what the
// backend says, and records an exit for those that are gone. Checks run
// in each VM's queue, so they never race with the VM's own commands.
func (w *Worker) Reconcile(ctx context.Context) {
	w.mu.Lock()
	var names []string
	for n, l := range w.vms {
		if l.state == api.StateRunning || l.state == api.StateSuspended {
			names = append(names, n)
		}
	}
	w.mu.Unlock()
	for _, n := range names {
		w.exec.Do(n, func() {
			w.mu.Lock()
			l, ok := w.vms[n]
			if !ok || (l.state != api.StateRunning && l.state != api.StateSuspended) {
				w.mu.Unlock()
				return
			}
			h := l.handle.Clone()
			w.mu.Unlock()
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			st, err := w.cfg.Router.State(cctx, h)
			cancel()
			if err == nil && st != api.StateStopped {
				return
			}
			if err != nil && !errors.Is(err, backends.ErrNotFound) {
				return
			}
			w.emitExit(ctx, backends.Exit{Handle: h, Reason: "found not running by reconciliation"})
		})
	}
}

func hostMemoryMB() int {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 4096
	}
	var kb int
	if _, err := fmt.Sscanf(string(b), "MemTotal: %d kB", &kb); err != nil {
		return 4096
	}
	return kb / 1024
}

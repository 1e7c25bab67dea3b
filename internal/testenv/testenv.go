// Package testenv starts real vmherd parts for tests: an embedded
// nats-server with JetStream on a temp dir, engines and workers in-process,
// and helpers to publish commands and read events back from the streams.
package testenv

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/engine"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/images"
	"github.com/vmherd/vmherd/internal/natsserver"
	"github.com/vmherd/vmherd/internal/sshkeys"
	"github.com/vmherd/vmherd/internal/worker"
	"github.com/vmherd/vmherd/schemas"
)

// Env is one NATS server and the parts running against it.
type Env struct {
	T   testing.TB
	URL string
	// Creds is the credentials file of the env's connections ("" none);
	// CA the certificates that verify a TLS server ("" none).
	Creds, CA string
	Server    *natsserver.Server
	NC        *nats.Conn
	JS        jetstream.JetStream
	Names     api.Names
	Store     *events.Store
	Log       *slog.Logger
	Dir       string

	mu    sync.Mutex
	parts []*Part
}

// Part is a running engine or worker.
type Part struct {
	Name   string
	Engine *engine.Engine
	Worker *worker.Worker
	nc     *nats.Conn
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// Stop stops the part gracefully (drain) and waits for it.
func (p *Part) Stop() error {
	var err error
	p.once.Do(func() {
		p.cancel()
		select {
		case err = <-p.done:
		case <-time.After(60 * time.Second):
			err = fmt.Errorf("%s did not stop within 60s", p.Name)
		}
		p.nc.Close()
	})
	return err
}

// Kill stops a worker as if its process died: backend calls in progress
// are abandoned, nothing more is acked or written.
func (p *Part) Kill() {
	if p.Worker != nil {
		p.Worker.Kill()
	}
	p.nc.Close() // no more acks or writes
	_ = p.Stop()
}

// Logger for tests: quiet unless VMHERD_TEST_LOG=debug.
func Logger() *slog.Logger {
	if lvl := os.Getenv("VMHERD_TEST_LOG"); lvl != "" {
		var l slog.Level
		_ = l.UnmarshalText([]byte(lvl))
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// New starts an embedded server with JetStream in a temp dir and creates
// the streams. Sync "default" keeps tests fast; durability tests set it.
func New(t testing.TB) *Env {
	t.Helper()
	dir := t.TempDir()
	ns, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", StoreDir: dir + "/js", Sync: "default"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Stop)
	e := &Env{T: t, URL: ns.ClientURL(), Server: ns, Names: api.DefaultNames, Log: Logger(), Dir: dir}
	e.NC, e.JS = e.Connect()
	ctx := context.Background()
	if err := jsetup.Ensure(ctx, e.JS, e.Names, jsetup.DefaultSettings); err != nil {
		t.Fatal(err)
	}
	if e.Store, err = events.NewStore(ctx, e.JS, e.Names, api.EngineWriter); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.stopAll)
	return e
}

// Connect opens a new connection to the env's server.
func (e *Env) Connect() (*nats.Conn, jetstream.JetStream) {
	e.T.Helper()
	opts := []nats.Option{nats.MaxReconnects(-1), nats.ReconnectWait(100 * time.Millisecond)}
	if e.Creds != "" {
		opts = append(opts, nats.UserCredentials(e.Creds))
	}
	if e.CA != "" {
		opts = append(opts, nats.RootCAs(e.CA))
	}
	nc, err := nats.Connect(e.URL, opts...)
	if err != nil {
		e.T.Fatal(err)
	}
	e.T.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		e.T.Fatal(err)
	}
	return nc, js
}

func (e *Env) stopAll() {
	e.mu.Lock()
	parts := append([]*Part(nil), e.parts...)
	e.mu.Unlock()
	for _, p := range parts {
		_ = p.Stop()
	}
}

func (e *Env) start(name string, run func(ctx context.Context) error, nc *nats.Conn) *Part {
	ctx, cancel := context.WithCancel(context.Background())
	p := &Part{Name: name, nc: nc, cancel: cancel, done: make(chan error, 1)}
	go func() { p.done <- run(ctx) }()
	e.mu.Lock()
	e.parts = append(e.parts, p)
	e.mu.Unlock()
	return p
}

// EngineConfig tweaks StartEngine.
type EngineConfig struct {
	ID            string
	HostLostAfter time.Duration
	AckWait       time.Duration
	// RetainDestroyed: the engine's --retain-destroyed (0: keep for ever).
	RetainDestroyed time.Duration
	// DuplicateWindow is the event stream's duplicate window as the engine
	// believes it (0: the default); the stream keeps its own.
	DuplicateWindow time.Duration
	// NoSweeper runs the engine without its VM_SSH sweeper.
	NoSweeper bool
}

// StartEngine runs an engine on its own connection.
func (e *Env) StartEngine(c EngineConfig) *Part {
	e.T.Helper()
	if c.ID == "" {
		c.ID = "e1"
	}
	nc, js := e.Connect()
	settings := jsetup.DefaultSettings
	if c.DuplicateWindow > 0 {
		settings.DuplicateWindow = c.DuplicateWindow
	}
	eng, err := engine.New(context.Background(), engine.Config{
		JS: js, Names: e.Names, Settings: settings, Log: e.Log, ID: c.ID,
		HostLostAfter: c.HostLostAfter, AckWait: c.AckWait, RetainDestroyed: c.RetainDestroyed,
	})
	if err != nil {
		e.T.Fatal(err)
	}
	sweeper := &sshkeys.Sweeper{JS: js, Names: e.Names, Log: e.Log}
	p := e.start("engine "+c.ID, func(ctx context.Context) error {
		// As app.RunEngine: the engine and its VM_SSH sweeper.
		g, gctx := errgroup.WithContext(ctx)
		g.Go(func() error { return eng.Run(gctx) })
		if !c.NoSweeper {
			g.Go(func() error { return sweeper.Run(gctx) })
		}
		return g.Wait()
	}, nc)
	p.Engine = eng
	return p
}

// WorkerConfig tweaks StartWorker.
type WorkerConfig struct {
	Host    string
	Noop    *noop.Backend // shared across worker incarnations
	Extra   map[api.BackendTag]backends.Hypervisor
	Default api.BackendTag
	AckWait time.Duration
	// Capacity in MiB offered to placement.
	MemoryMB  int
	Reconcile time.Duration
	// ImageRoots and VMDirs: the worker's image rule (worker.Config).
	ImageRoots, VMDirs []string
	// ImageStore: the worker's image store (worker.Config).
	ImageStore string
	// ImagePolicy: what its pulls may reach (worker.Config); tests that
	// pull from a loopback server allow private addresses.
	ImagePolicy images.Policy
}

// StartWorker runs a worker on its own connection (use WaitHost to wait for its first
// heartbeat).
func (e *Env) StartWorker(c WorkerConfig) *Part {
	e.T.Helper()
	if c.Host == "" {
		c.Host = "h1"
	}
	bs := map[api.BackendTag]backends.Hypervisor{}
	if c.Noop == nil {
		c.Noop = noop.New(noop.Options{})
	}
	bs[api.BackendNoop] = c.Noop
	for k, v := range c.Extra {
		bs[k] = v
	}
	if c.Default == "" {
		c.Default = api.BackendNoop
	}
	r, err := backends.NewRouter(c.Default, bs)
	if err != nil {
		e.T.Fatal(err)
	}
	if c.MemoryMB == 0 {
		c.MemoryMB = 64 << 10
	}
	nc, js := e.Connect()
	w, err := worker.New(context.Background(), worker.Config{
		NC: nc, JS: js, Names: e.Names, Host: c.Host, Router: r, Log: e.Log,
		AckWait: c.AckWait, HeartbeatEvery: 200 * time.Millisecond, ReconcileEvery: c.Reconcile,
		Capacity: api.Resources{MemoryMB: c.MemoryMB}, ImageRoots: c.ImageRoots, VMDirs: c.VMDirs, ImageStore: c.ImageStore,
		ImagePolicy: c.ImagePolicy,
	})
	if err != nil {
		e.T.Fatal(err)
	}
	p := e.start("worker "+c.Host, w.Run, nc)
	p.Worker = w
	return p
}

// Send publishes a command body (raw JSON; "" for none) with a message id
// and returns the message id, which is also the default command id.
func (e *Env) Send(vmName, action, body, msgID string) {
	e.T.Helper()
	m := nats.NewMsg(e.Names.Command(vmName, action))
	m.Data = []byte(body)
	if msgID != "" {
		m.Header.Set("Nats-Msg-Id", msgID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := e.JS.PublishMsg(ctx, m); err != nil {
		e.T.Fatalf("publishing %s %s: %v", action, vmName, err)
	}
}

// SendCmd publishes a command with the given id.
func (e *Env) SendCmd(vmName, action, cmdID string, cmd api.Command) {
	e.T.Helper()
	cmd.CommandID = cmdID
	b, _ := json.Marshal(cmd)
	e.Send(vmName, action, string(b), cmdID)
}

// Events returns every stored event of one VM, checking each against its schema.
func (e *Env) Events(vmName string) []events.Stored {
	e.T.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	evs, err := e.Store.ReadVM(ctx, vmName, 1)
	if err != nil {
		e.T.Fatal(err)
	}
	return evs
}

// CountType counts the VM's events of type t.
func (e *Env) CountType(vmName string, t api.EventType) int {
	e.T.Helper()
	n := 0
	for _, s := range e.Events(vmName) {
		if s.Event != nil && s.Event.Type == t {
			n++
		}
	}
	return n
}

// WaitFor polls (never sleeps blindly) until cond holds or the deadline passes.
func (e *Env) WaitFor(what string, timeout time.Duration, cond func() bool) {
	e.T.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			e.T.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Result waits for the result event of a command and returns it.
func (e *Env) Result(vmName, cmdID string, timeout time.Duration) *api.Event {
	e.T.Helper()
	var found *api.Event
	e.WaitFor(fmt.Sprintf("result of %s on %s", cmdID, vmName), timeout, func() bool {
		for _, s := range e.Events(vmName) {
			if s.Event != nil && s.Event.CommandID == cmdID && (s.Event.Type.IsResult() || s.Event.Type == api.TypeRejected) {
				found = s.Event
				return true
			}
		}
		return false
	})
	return found
}

// Decision waits for the accepted/rejected event of a command.
func (e *Env) Decision(vmName, cmdID string, timeout time.Duration) *api.Event {
	e.T.Helper()
	var found *api.Event
	e.WaitFor(fmt.Sprintf("decision on %s for %s", cmdID, vmName), timeout, func() bool {
		for _, s := range e.Events(vmName) {
			if s.Event != nil && s.Event.CommandID == cmdID && (s.Event.Type == api.TypeAccepted || s.Event.Type == api.TypeRejected) {
				found = s.Event
				return true
			}
		}
		return false
	})
	return found
}

// AllEvents returns every VM event in the stream, each validated against
// its JSON Schema (a test fails on any event that does not match). Host
// events (vm.host.>) are validated too, and left out.
func (e *Env) AllEvents() []events.Stored {
	e.T.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st := e.Store.Stream()
	info, err := st.Info(ctx)
	if err != nil {
		e.T.Fatal(err)
	}
	var out []events.Stored
	if info.State.Msgs == 0 {
		return out
	}
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{InactiveThreshold: jsetup.ReaderIdle})
	if err != nil {
		e.T.Fatal(err)
	}
	defer jsetup.DropConsumer(st, cons)
	for seen, empty := 0, 0; seen < int(info.State.Msgs); {
		batch, err := cons.Fetch(min(1000, int(info.State.Msgs)-seen), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			e.T.Fatal(err)
		}
		n := 0
		for m := range batch.Messages() {
			n++
			md, _ := m.Metadata()
			if _, _, host := e.Names.ParseHostEventSubject(m.Subject()); host {
				if err := schemas.Validate("host_event", m.Data()); err != nil {
					e.T.Errorf("host event at seq %d on %s does not match its schema: %v\n%s", md.Sequence.Stream, m.Subject(), err, m.Data())
				}
				continue
			}
			if err := schemas.ValidateEvent(m.Data()); err != nil {
				e.T.Errorf("event at seq %d on %s does not match its schema: %v\n%s", md.Sequence.Stream, m.Subject(), err, m.Data())
			}
			ev, _ := events.Decode(m.Data())
			out = append(out, events.Stored{Seq: md.Sequence.Stream, Event: ev})
		}
		if n == 0 {
			// A fresh ordered consumer on a cluster can come back empty
			// once while it settles; three empty fetches in a row end it.
			if empty++; empty == 3 {
				e.T.Errorf("reading the events stream: %d of %d messages read, then nothing", seen, info.State.Msgs)
				break
			}
			continue
		}
		empty = 0
		seen += n
	}
	return out
}

// WaitHost waits until the engine sees host alive and decides commands
// (its pull requests are open on the command consumer, which is how vmctl
// tells that an engine runs; the engine opens them only after it has
// loaded the hosts).
func (e *Env) WaitHost(eng *Part, host string) {
	e.T.Helper()
	e.WaitFor("host "+host+" alive and the engine pulling commands", 20*time.Second, func() bool {
		if !eng.Engine.Hosts().Alive(host) {
			return false
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err := e.JS.Consumer(ctx, e.Names.CommandsStream(), e.Names.CommandConsumer())
		return err == nil && c.CachedInfo().NumWaiting > 0
	})
}

// Attach connects to a server (or cluster: comma-separated URLs) someone
// else runs, where an engine has made the streams and buckets; like a
// worker, it only checks them (the engine owns their settings).
func Attach(t testing.TB, url string) *Env { return AttachTLS(t, url, "", "") }

// AttachCreds is Attach with a credentials file (an engine's admin creds,
// <data-dir>/auth/admin.creds).
func AttachCreds(t testing.TB, url, creds string) *Env { return AttachTLS(t, url, creds, "") }

// AttachTLS is AttachCreds to a server with TLS, verified with ca.
func AttachTLS(t testing.TB, url, creds, ca string) *Env {
	t.Helper()
	e := &Env{T: t, URL: url, Creds: creds, CA: ca, Names: api.DefaultNames, Log: Logger(), Dir: t.TempDir()}
	e.NC, e.JS = e.Connect()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := jsetup.RetryStartup(ctx, e.Log, "the engine's streams", func(ctx context.Context) error {
		return jsetup.Check(ctx, e.JS, e.Names)
	}); err != nil {
		t.Fatal(err)
	}
	var err error
	if e.Store, err = events.NewStore(ctx, e.JS, e.Names, api.EngineWriter); err != nil {
		t.Fatal(err)
	}
	return e
}

package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/engine"
	"github.com/vmherd/vmherd/internal/natsserver"
	"github.com/vmherd/vmherd/internal/worker"
)

// benchHost is the worker's host id in every in-process pipeline.
const benchHost = "bench1"

// server is an embedded nats-server with JetStream on disk, as the engine
// runs it by default.
type server struct {
	ns   *natsserver.Server
	url  string
	dir  string
	sync string
}

func startServer(dir, sync string) (*server, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	ns, err := natsserver.Start(natsserver.Options{
		Listen: "127.0.0.1:-1", StoreDir: filepath.Join(dir, "jetstream"), Sync: sync, ServerName: "vmherd-bench",
	})
	if err != nil {
		return nil, err
	}
	return &server{ns: ns, url: ns.ClientURL(), dir: dir, sync: sync}, nil
}

// msgs returns how many messages the server has received from and sent
// to clients so far (its monitoring counters).
func (s *server) msgs() (in, out int64) {
	v, err := s.ns.Varz(nil)
	if err != nil {
		return 0, 0
	}
	return v.InMsgs, v.OutMsgs
}

func (s *server) stop() {
	s.ns.Stop()
	_ = os.RemoveAll(s.dir)
}

// connect opens a connection and its JetStream context.
func connect(url, name string) (*nats.Conn, jetstream.JetStream, error) {
	nc, err := nats.Connect(url, nats.Name(name), nats.MaxReconnects(-1))
	if err != nil {
		return nil, nil, fmt.Errorf("connecting to %s: %w", url, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}

// pipeline is an engine and a worker running in this process against a
// server, each on its own connection, as `engine --with-worker` runs them.
type pipeline struct {
	Engine *engine.Engine
	Worker *worker.Worker
	Noop   *noop.Backend

	conns  []*nats.Conn
	cancel context.CancelFunc
	done   chan error
}

// pipelineConfig shapes startPipeline.
type pipelineConfig struct {
	URL      string
	StateDir string
	// Extra backends besides Noop; Default names the host's default.
	Extra   map[api.BackendTag]backends.Hypervisor
	Default api.BackendTag
	// ImageRoots: the worker's image roots (the guest image's directory).
	ImageRoots []string
	// Migration: the worker's migration settings (figure 7).
	Migration worker.MigrationConfig
}

func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// startPipeline creates the streams, starts an engine and a worker and
// waits until the engine sees the worker's host alive.
func startPipeline(ctx context.Context, c pipelineConfig) (*pipeline, error) {
	p := &pipeline{done: make(chan error, 2)}
	fail := func(err error) (*pipeline, error) {
		p.close()
		return nil, err
	}
	enc, ejs, err := connect(c.URL, "bench-engine")
	if err != nil {
		return fail(err)
	}
	p.conns = append(p.conns, enc)
	if err := jsetup.Ensure(ctx, ejs, api.DefaultNames, jsetup.DefaultSettings); err != nil {
		return fail(err)
	}
	eng, err := engine.New(ctx, engine.Config{
		JS: ejs, Names: api.DefaultNames, Settings: jsetup.DefaultSettings, Log: quietLogger(),
		ID: "bench", StateDir: c.StateDir,
	})
	if err != nil {
		return fail(err)
	}
	p.Engine = eng

	p.Noop = noop.New(noop.Options{})
	bs := map[api.BackendTag]backends.Hypervisor{api.BackendNoop: p.Noop}
	for k, v := range c.Extra {
		bs[k] = v
	}
	def := c.Default
	if def == "" {
		def = api.BackendNoop
	}
	router, err := backends.NewRouter(def, bs)
	if err != nil {
		return fail(err)
	}
	wnc, wjs, err := connect(c.URL, "bench-worker")
	if err != nil {
		return fail(err)
	}
	p.conns = append(p.conns, wnc)
	w, err := worker.New(ctx, worker.Config{
		NC: wnc, JS: wjs, Names: api.DefaultNames, Host: benchHost, Router: router, Log: quietLogger(),
		HeartbeatEvery: time.Second,
		// Placement must never run out of room, whatever the VM count.
		Capacity:   api.Resources{Vcpus: 1 << 20, MemoryMB: 1 << 40},
		ImageRoots: c.ImageRoots,
		Migration:  c.Migration,
	})
	if err != nil {
		return fail(err)
	}
	p.Worker = w

	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	p.cancel = cancel
	go func() { p.done <- eng.Run(rctx) }()
	go func() { p.done <- w.Run(rctx) }()

	deadline := time.Now().Add(30 * time.Second)
	for {
		if eng.Hosts().Alive(benchHost) {
			return p, nil
		}
		if time.Now().After(deadline) {
			return fail(errors.New("the in-process worker's heartbeat did not reach the engine within 30s"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// close stops the engine and worker (drain) and closes their connections.
func (p *pipeline) close() {
	if p.cancel != nil {
		p.cancel()
		for range 2 {
			select {
			case <-p.done:
			case <-time.After(30 * time.Second):
			}
		}
	}
	for _, nc := range p.conns {
		nc.Close()
	}
}

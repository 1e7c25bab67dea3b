package app

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"

	"github.com/vmherd/vmherd/internal/engine"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/metrics"
	"github.com/vmherd/vmherd/internal/natsserver"
	"github.com/vmherd/vmherd/internal/worker"
)

// EngineOptions are the engine's flags.
type EngineOptions struct {
	DataDir     string
	Listen      string
	Sync        string
	ID          string
	HostTimeout time.Duration
	WithWorker  bool
	Concurrency int
	AckWait     time.Duration
	LogLevel    string
	// MetricsListen serves Prometheus metrics ("" for none).
	MetricsListen string
	// DrainTimeout bounds a graceful stop (cmd/engine only).
	DrainTimeout time.Duration
	Conn         ConnOptions
	Streams      StreamOptions
	Worker       WorkerOptions

	// Ready, if set, is called once the engine serves (tests).
	Ready func(url string, e *engine.Engine, w *worker.Worker)
}

// AddFlags registers every engine flag, and the local worker's.
func (o *EngineOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.DataDir, "data-dir", DefaultDataDir(), "data directory: embedded JetStream store and VM work directories")
	fs.StringVar(&o.Listen, "listen", "127.0.0.1:4222", "address of the embedded NATS server")
	fs.StringVar(&o.Sync, "sync", natsserver.DefaultSync, `embedded JetStream sync_interval: "always" (fsync every write), "default" (nats-server's 2m) or a duration`)
	fs.StringVar(&o.ID, "engine-id", "", "this engine's id, naming its projection consumer (default: generated once and kept in the data dir)")
	fs.DurationVar(&o.HostTimeout, "host-timeout", hosts.DefaultLostAfter, "a host whose worker has not heartbeated for this long is lost")
	fs.BoolVar(&o.WithWorker, "with-worker", false, "also run a local worker in this process (the single-host default)")
	fs.IntVar(&o.Concurrency, "engine-concurrency", 256, "commands decided at once (across VMs)")
	fs.DurationVar(&o.AckWait, "command-ack-wait", 30*time.Second, "ack wait of the command consumer")
	fs.StringVar(&o.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.MetricsListen, "metrics-listen", "", "serve Prometheus metrics at http://ADDR/metrics, the local worker's included (e.g. 127.0.0.1:9100; default: off)")
	addDrainFlag(fs, &o.DrainTimeout)
	o.Conn.AddFlags(fs, "")
	o.Streams.AddFlags(fs)
	o.Worker.AddFlags(fs, false)
}

// RunEngine runs the engine (and the embedded server and local worker when
// asked) until ctx ends, then drains and stops in order.
func RunEngine(ctx context.Context, o EngineOptions) error {
	log, err := NewLogger(o.LogLevel)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.DataDir, 0o755); err != nil {
		return fmt.Errorf("data dir %s: %w (choose another with --data-dir)", o.DataDir, err)
	}
	// One engine per data dir, whether it embeds the server (JetStream store)
	// or not (engine id, projection checkpoint, local worker's VM dirs):
	// taken before anything in the dir is touched, held until we return.
	lock, err := LockDataDir(o.DataDir)
	if err != nil {
		return fmt.Errorf("engine: %w", err)
	}
	defer lock.Release()
	if o.ID == "" {
		if o.ID, err = engineID(o.DataDir); err != nil {
			return err
		}
	}
	url := o.Conn.URL
	var ns *natsserver.Server
	if url == "" {
		ns, err = natsserver.Start(natsserver.Options{
			Listen: o.Listen, StoreDir: filepath.Join(o.DataDir, "jetstream"), Sync: o.Sync,
			ServerName: "vmherd-" + o.ID, Logger: log,
		})
		if err != nil {
			return fmt.Errorf("engine: %w", err)
		}
		defer ns.Stop()
		url = ns.ClientURL()
		log.Info("embedded NATS serving", "url", url, "store", filepath.Join(o.DataDir, "jetstream"), "sync", o.Sync)
	}
	conn := o.Conn
	conn.URL = url
	conn.Name = "vmherd-engine-" + o.ID
	nc, js, err := conn.ConnectJS(true)
	if err != nil {
		return err
	}
	defer nc.Close()
	if err := ensureStreams(ctx, js, o.Streams, log); err != nil {
		return err
	}
	var ms *metrics.Set
	if o.MetricsListen != "" {
		ms = metrics.New()
		if _, err := ms.Serve(ctx, o.MetricsListen, log); err != nil {
			return err
		}
	}
	var eng *engine.Engine
	err = events.RetryStartup(ctx, log, "the engine's consumers and buckets", func(sctx context.Context) (err error) {
		eng, err = engine.New(sctx, engine.Config{
			Metrics: ms,
			JS:      js, Names: o.Streams.Names(), Settings: o.Streams.Settings(), Log: log, ID: o.ID,
			HostLostAfter: o.HostTimeout, Concurrency: o.Concurrency, AckWait: o.AckWait,
			StateDir: o.DataDir,
		})
		return err
	})
	if err != nil {
		return err
	}
	var w *worker.Worker
	if o.WithWorker {
		wo := o.Worker
		wo.DataDir = o.DataDir
		wo.Metrics = ms
		// The local worker has its own connection, as a remote one would.
		wconn := conn
		wconn.Name = "vmherd-worker-" + wo.Host
		c, wjs, err := wconn.ConnectJS(true)
		if err != nil {
			return err
		}
		defer c.Close()
		if w, err = wo.NewWorker(ctx, Connected{NC: c, JS: wjs}, o.Streams.Names(), log); err != nil {
			return err
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return eng.Run(gctx) })
	if w != nil {
		g.Go(func() error { return w.Run(gctx) })
	}
	log.Info("engine serving", "id", o.ID, "nats", url, "local_worker", o.WithWorker)
	if o.Ready != nil {
		o.Ready(url, eng, w)
	}
	err = g.Wait()
	log.Info("engine stopped")
	return err
}

// ensureStreams creates or updates the streams and buckets: the engine is
// their only owner.
func ensureStreams(ctx context.Context, js jetstream.JetStream, so StreamOptions, log *slog.Logger) error {
	return events.RetryStartup(ctx, log, "creating streams and buckets", func(ctx context.Context) error {
		return events.Ensure(ctx, js, so.Names(), so.Settings())
	})
}

// engineID reads the engine id kept in the data dir, or makes one.
func engineID(dir string) (string, error) {
	p := filepath.Join(dir, "engine-id")
	if b, err := os.ReadFile(p); err == nil {
		if id := strings.TrimSpace(string(b)); id != "" {
			return id, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	var r [4]byte
	_, _ = rand.Read(r[:])
	hn, _ := os.Hostname()
	id := sanitizeHost(hn)
	if len(id) > 40 {
		id = id[:40]
	}
	id = id + "-" + hex.EncodeToString(r[:])
	if err := os.WriteFile(p, []byte(id+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("writing %s: %w", p, err)
	}
	return id, nil
}

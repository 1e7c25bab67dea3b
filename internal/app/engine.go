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
	"strconv"
	"strings"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/datadir"
	"github.com/vmherd/vmherd/internal/engine"
	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/jspolicy"
	"github.com/vmherd/vmherd/internal/metrics"
	"github.com/vmherd/vmherd/internal/natsserver"
	"github.com/vmherd/vmherd/internal/sshkeys"
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
	// NoAuth runs the embedded server without authentication (loopback only).
	NoAuth bool
	// MaxVMsPerHost and Quotas (PREFIX=N) bound the VMs that exist.
	MaxVMsPerHost int
	Quotas        []string
	// CommandRate and CommandBurst: each issuer's command rate limit.
	CommandRate  float64
	CommandBurst int
	// MaxCommandTimeout is the largest timeout_s a command may ask for.
	MaxCommandTimeout time.Duration
	// RetainDestroyed: destroyed VMs older than this are purged (0: never).
	RetainDestroyed time.Duration
	// AuthorityDir, if set, is the authority engine init made: the engine
	// answers hosts joining with a token (package join).
	AuthorityDir string
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
	fs.IntVar(&o.MaxVMsPerHost, "max-vms-per-host", 0, "the most VMs (not destroyed) one host may have; a prepare beyond it is rejected (0: no limit)")
	fs.StringArrayVar(&o.Quotas, "quota", nil, "PREFIX=N: at most N VMs (not destroyed) whose names start with PREFIX (repeatable)")
	fs.Float64Var(&o.CommandRate, "command-rate", 50, "commands per second each issuer (the identity in vm.cmd.<vm>.<action>.<issuer>) may have decided; more are rejected (0: no limit)")
	fs.IntVar(&o.CommandBurst, "command-burst", 200, "commands an issuer may send at once before --command-rate applies")
	fs.DurationVar(&o.MaxCommandTimeout, "max-command-timeout", engine.DefaultMaxCommandTimeout, "the largest timeout_s a command may ask for (a stop's grace holds the VM and a worker slot that long); more is rejected (at most 24h)")
	fs.DurationVar(&o.RetainDestroyed, "retain-destroyed", engine.DefaultRetainDestroyed, "purge a VM destroyed longer ago than this: its record leaves VM_RECORDS and its events VM_EVENTS, and the name is free and new (0: keep destroyed VMs for ever; vmctl purge does it by hand)")
	fs.BoolVar(&o.NoAuth, "no-auth", false, "run the embedded NATS server without authentication (refused unless --listen is a loopback address; for trying things only)")
	fs.StringVar(&o.MetricsListen, "metrics-listen", "", "serve Prometheus metrics at http://ADDR/metrics, the local worker's included (e.g. 127.0.0.1:9100; default: off)")
	fs.StringVar(&o.AuthorityDir, "authority-dir", "", "the authority engine init made: answer hosts that join with a token (one engine, on the machine that keeps it; docs/deploy.md)")
	addDrainFlag(fs, &o.DrainTimeout)
	o.Conn.AddFlags(fs, "")
	o.Streams.AddFlags(fs)
	o.Worker.AddFlags(fs, false)
}

// RunEngine runs the engine (and the embedded server and local worker when
// asked) until ctx ends, then drains and stops in order. If NATS refuses
// its credentials for good, at start or later, it stops with that reason
// (ErrWillNotHeal).
func RunEngine(ctx context.Context, o EngineOptions) error {
	ctx, fail := context.WithCancelCause(ctx)
	defer fail(nil)
	err := runEngine(ctx, o, fail)
	if c := context.Cause(ctx); errors.Is(c, ErrWillNotHeal) {
		return c
	}
	return err
}

func runEngine(ctx context.Context, o EngineOptions, fail func(error)) error {
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
	conn := o.Conn
	var ns *natsserver.Server
	var creds localCreds
	if url == "" {
		var authority *auth.Authority
		if !o.NoAuth {
			if authority, creds, err = issueLocalCreds(o); err != nil {
				return err
			}
			conn.Creds = creds.engine
			log.Info("authentication on: credentials for vmctl and the nats CLI", "admin_creds", creds.admin)
		}
		ns, err = natsserver.Start(natsserver.Options{
			Listen: o.Listen, StoreDir: filepath.Join(o.DataDir, "jetstream"), Sync: o.Sync,
			ServerName: "vmherd-" + o.ID, Logger: log, Auth: authority,
		})
		if err != nil {
			return fmt.Errorf("engine: %w", err)
		}
		defer ns.Stop()
		url = ns.ClientURL()
		log.Info("embedded NATS serving", "url", url, "store", filepath.Join(o.DataDir, "jetstream"), "sync", o.Sync)
	}
	conn.URL = url
	conn.Name = "vmherd-engine-" + o.ID
	nc, js, err := conn.DialDaemon(ctx, log, fail)
	if err != nil {
		return err
	}
	defer nc.Close()
	// Hosts may join while the cluster still elects its leaders: the join
	// service needs no stream.
	var serveJoins func(context.Context) error
	if o.AuthorityDir != "" {
		if o.Conn.URL == "" {
			return fmt.Errorf("--authority-dir is for an engine against a NATS cluster (--nats-url)")
		}
		jctx, stopJoins := context.WithCancel(ctx)
		defer stopJoins()
		serve, closeJoin, err := joinService(ctx, o, conn, log, fail)
		if err != nil {
			return err
		}
		defer closeJoin()
		joined := make(chan error, 1)
		go func() { joined <- serve(jctx) }()
		serveJoins = func(ctx context.Context) error {
			select {
			case <-ctx.Done():
				stopJoins()
				return <-joined
			case err := <-joined:
				return err
			}
		}
	}
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
	quotas, err := parseQuotas(o.MaxVMsPerHost, o.Quotas)
	if err != nil {
		return err
	}
	if o.CommandRate < 0 || o.CommandBurst < 1 {
		return fmt.Errorf("--command-rate %g --command-burst %d: the rate must be >= 0 and the burst >= 1", o.CommandRate, o.CommandBurst)
	}
	if o.MaxCommandTimeout != 0 && (o.MaxCommandTimeout < time.Second || o.MaxCommandTimeout > 24*time.Hour) {
		return fmt.Errorf("--max-command-timeout %s: want 1s to 24h", o.MaxCommandTimeout)
	}
	if o.RetainDestroyed < 0 {
		return fmt.Errorf("--retain-destroyed %s: want a duration >= 0 (0 keeps destroyed VMs for ever)", o.RetainDestroyed)
	}
	var eng *engine.Engine
	err = jsetup.RetryStartup(ctx, log, "the engine's consumers and buckets", func(sctx context.Context) (err error) {
		eng, err = engine.New(sctx, engine.Config{
			Metrics: ms,
			JS:      js, Names: o.Streams.Names(), Settings: o.Streams.Settings(), Log: log, ID: o.ID,
			HostLostAfter: o.HostTimeout, Concurrency: o.Concurrency, AckWait: o.AckWait, Quotas: quotas,
			StateDir: o.DataDir, RateLimit: engine.RateLimit{PerSecond: o.CommandRate, Burst: o.CommandBurst},
			RetainDestroyed: o.RetainDestroyed,
		})
		return err
	})
	if err != nil {
		return err
	}
	eng.SetMaxCommandTimeout(o.MaxCommandTimeout)
	var w *worker.Worker
	if o.WithWorker {
		wo := o.Worker
		wo.DataDir = o.DataDir
		wo.Metrics = ms
		// The local worker has its own connection, as a remote one would.
		wconn := conn
		wconn.Name = "vmherd-worker-" + wo.Host
		wconn.InboxPrefix = auth.Identity{Role: auth.RoleWorker, Host: wo.Host}.InboxPrefix()
		if creds.worker != "" {
			wconn.Creds = creds.worker
		}
		c, wjs, err := wconn.DialDaemon(ctx, log, fail)
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
	if serveJoins != nil {
		g.Go(func() error { return serveJoins(gctx) })
	}
	// A destroyed VM's generated key, host keys and provisioning log go
	// with it, whoever destroyed it (docs/trust.md).
	sweeper := &sshkeys.Sweeper{JS: js, Names: o.Streams.Names(), Log: log}
	g.Go(func() error { return sweeper.Run(gctx) })
	go returnMemory(gctx)
	// What permissions cannot say about consumers (push deliver subjects,
	// durables on the streams people read): docs/trust.md.
	g.Go(func() error {
		return (&jspolicy.Enforcer{JS: js, Names: o.Streams.Names(), Log: log}).Run(gctx)
	})
	if w != nil {
		g.Go(func() error { return w.Run(gctx) })
	}
	log.Info("engine serving", "id", o.ID, "nats", url, "local_worker", o.WithWorker)
	sdNotify(log, "READY=1")
	if o.Ready != nil {
		o.Ready(url, eng, w)
	}
	err = g.Wait()
	log.Info("engine stopped")
	return err
}

// parseQuotas reads --max-vms-per-host and --quota PREFIX=N.
func parseQuotas(perHost int, specs []string) (engine.Quotas, error) {
	q := engine.Quotas{PerHost: perHost, Prefix: map[string]int{}}
	if perHost < 0 {
		return q, fmt.Errorf("--max-vms-per-host %d: must not be negative", perHost)
	}
	for _, s := range specs {
		p, n, ok := strings.Cut(s, "=")
		v, err := strconv.Atoi(n)
		if !ok || p == "" || err != nil || v < 0 {
			return q, fmt.Errorf("--quota %q: want PREFIX=N, e.g. --quota ci-=50", s)
		}
		q.Prefix[p] = v
	}
	return q, nil
}

// localCreds are the credentials an engine with an embedded server issues
// itself in <data-dir>/auth: the admin's (vmctl, nats CLI), its own and
// its local worker's.
type localCreds struct{ admin, engine, worker string }

// issueLocalCreds opens (or creates) the authority in the data dir and
// writes the credentials files that do not exist yet (mode 0600).
func issueLocalCreds(o EngineOptions) (*auth.Authority, localCreds, error) {
	dir := datadir.AuthDir(o.DataDir)
	a, err := auth.Open(dir)
	if err != nil {
		return nil, localCreds{}, err
	}
	names := o.Streams.Names()
	c := localCreds{admin: datadir.AdminCreds(o.DataDir), engine: filepath.Join(dir, "engine.creds")}
	ids := map[string]auth.Identity{
		c.admin:  {Role: auth.RoleAdmin, Names: names},
		c.engine: {Role: auth.RoleEngine, Names: names},
	}
	if o.WithWorker {
		c.worker = filepath.Join(dir, "worker-"+o.Worker.Host+".creds")
		ids[c.worker] = auth.Identity{Role: auth.RoleWorker, Host: o.Worker.Host, Names: names}
	}
	for path, id := range ids {
		if err := a.WriteCreds(path, id); err != nil {
			return nil, localCreds{}, err
		}
	}
	return a, c, nil
}

// ensureStreams creates or updates the streams and buckets: the engine is
// their only owner.
func ensureStreams(ctx context.Context, js jetstream.JetStream, so StreamOptions, log *slog.Logger) error {
	return jsetup.RetryStartup(ctx, log, "creating streams and buckets", func(ctx context.Context) error {
		return jsetup.Ensure(ctx, js, so.Names(), so.Settings())
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

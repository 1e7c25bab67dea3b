package app

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/pflag"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/images"
	"github.com/vmherd/vmherd/internal/metrics"
	"github.com/vmherd/vmherd/internal/relay"
	"github.com/vmherd/vmherd/internal/worker"
)

// WorkerOptions are the worker's flags (also accepted by the engine for
// its --with-worker local worker).
type WorkerOptions struct {
	Host           string
	DataDir        string
	Backends       string
	DefaultBackend string
	NoopLatency    time.Duration
	NoopFailRate   float64
	NoopStateDir   string
	AckWait        time.Duration
	Concurrency    int
	Heartbeat      time.Duration
	Reconcile      time.Duration
	Accel          string
	CapacityMemMB  int
	CapacityVcpus  int
	ImageDirs      []string
	// Image pulls (package images' Policy).
	ImageAllowPrivate      bool
	ImageAllowHTTPRegistry bool
	ImageMaxSize           string
	ImagePullTimeout       time.Duration
	// Tunnels to guests (package relay's Limits).
	Tunnels, TunnelsPerIdentity int
	// Migration traffic (worker.MigrationConfig): the address other
	// hosts reach, the ports, the stall bound and the downtime aimed for.
	NoopMigrateLatency time.Duration
	MigrationListen    string
	MigrationPorts     string
	MigrationStall     time.Duration
	MigrationDowntime  time.Duration
	MigrationBandwidth int64
	MigrationTLSDir    string
	// MigrationSwitchDelay is a fault tests' hook (hidden flag).
	MigrationSwitchDelay time.Duration

	PropolisServers    []string
	PropolisBin        string
	PropolisBootrom    string
	PropolisZvolParent string
	PropolisLink       string
	PropolisListenIP   string
	PropolisPortBase   int

	// Noop, when set, is used instead of a new Noop backend (tests share
	// one between worker incarnations, as VMs outlive a worker crash).
	Noop *noop.Backend
	// Metrics, when set, records the worker's metrics (the engine shares
	// its set with its local worker).
	Metrics *metrics.Set
}

// AddFlags registers the worker flags. withDataDir is false for the
// engine, which has its own --data-dir.
func (o *WorkerOptions) AddFlags(fs *pflag.FlagSet, withDataDir bool) {
	hn, _ := os.Hostname()
	fs.StringVar(&o.Host, "host", sanitizeHost(hn), "this host's id in placement and task subjects")
	if withDataDir {
		fs.StringVar(&o.DataDir, "data-dir", DefaultDataDir(), "where VM work directories live")
	}
	fs.StringVar(&o.Backends, "backends", "noop,qemu", "backends to enable on this host (noop, qemu, propolis)")
	fs.StringVar(&o.DefaultBackend, "default-backend", "", "backend for specs that name none (default: qemu if enabled and available, else the first enabled)")
	fs.DurationVar(&o.NoopLatency, "noop-latency", 0, "latency injected into every Noop backend call")
	fs.Float64Var(&o.NoopFailRate, "noop-fail-rate", 0, "fraction (0..1) of Noop backend calls that fail")
	fs.DurationVar(&o.NoopMigrateLatency, "noop-migrate-latency", 0, "how long a Noop backend's simulated migration copy takes (default: --noop-latency)")
	fs.StringVar(&o.NoopStateDir, "noop-state-dir", "", "keep Noop VM state in files here, so it outlives the worker process (default: <data-dir>/noop)")
	fs.DurationVar(&o.AckWait, "task-ack-wait", 30*time.Second, "ack wait of the task consumer (long calls signal progress)")
	fs.IntVar(&o.Concurrency, "concurrency", 64, "backend calls run at once")
	fs.DurationVar(&o.Heartbeat, "heartbeat", 2*time.Second, "heartbeat interval")
	fs.DurationVar(&o.Reconcile, "reconcile", 10*time.Second, "how often running VMs are checked against the hypervisor")
	fs.StringVar(&o.Accel, "accel", "auto", "QEMU accelerator: auto (KVM only on real VMX/SVM), kvm or tcg")
	fs.StringArrayVar(&o.ImageDirs, "image-dir", nil, "a directory base images may come from, besides the image store <data-dir>/images (repeatable); spec.image_path must resolve, symlinks followed, inside one of them and outside <data-dir>/vms")
	fs.BoolVar(&o.ImageAllowPrivate, "image-allow-private", false, "let image pulls reach loopback, private, link-local (cloud metadata) and other non-public addresses; off, each connection's address is checked as it is dialled, redirects too")
	fs.BoolVar(&o.ImageAllowHTTPRegistry, "image-allow-http-registry", false, "let oci:// pulls fall back to plain HTTP for a registry on localhost or a private address")
	fs.StringVar(&o.ImageMaxSize, "image-max-size", "64GiB", "largest image a pull stores (decompressed) or downloads, e.g. 20GiB or 512MiB")
	fs.DurationVar(&o.ImagePullTimeout, "image-pull-timeout", images.DefaultPullTimeout, "longest a pull may take")
	fs.IntVar(&o.Tunnels, "tunnels", relay.DefaultTunnels, "tunnels to this host's guests open at once (vmctl proxy, ssh, port-forward); more are refused until some close")
	fs.IntVar(&o.TunnelsPerIdentity, "tunnels-per-identity", relay.DefaultTunnelsPerRequester, "tunnels one identity (its inbox) may have open to this host's guests at once")
	fs.StringVar(&o.MigrationListen, "migration-listen", "127.0.0.1", "this host's address the other hosts reach for migration traffic (a VM's disk and memory arriving here)")
	fs.StringVar(&o.MigrationPorts, "migration-ports", defaultMigrationPorts, "the ports migration traffic to this host takes, LO-HI")
	fs.DurationVar(&o.MigrationStall, "migration-stall", time.Minute, "a live migration from this host that makes no progress for this long is aborted (the vm keeps running here)")
	fs.DurationVar(&o.MigrationDowntime, "migration-downtime", 300*time.Millisecond, "the longest pause of a guest at the switch of a live migration that QEMU aims for")
	fs.StringVar(&o.MigrationTLSDir, "migration-tls-dir", "", "QEMU x509 files (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem; certificates for this host's --migration-listen address): migrations to and from this host then go over TLS only, both peers checked against the CA")
	fs.Int64Var(&o.MigrationBandwidth, "migration-max-bandwidth", 0, "cap a live migration from this host (disk mirror and memory) at this many bytes per second (0: no cap)")
	fs.DurationVar(&o.MigrationSwitchDelay, "migration-switch-delay", 0, "for fault tests only: hold a finished live send this long before storing its switch")
	_ = fs.MarkHidden("migration-switch-delay")
	fs.IntVar(&o.CapacityMemMB, "capacity-memory-mb", 0, "memory offered to VMs (default: the machine's)")
	fs.IntVar(&o.CapacityVcpus, "capacity-vcpus", 0, "vCPUs offered to VMs (default: 4 × the machine's CPUs, a 4:1 overcommit)")
	fs.StringSliceVar(&o.PropolisServers, "propolis-server", nil, "already-running propolis-server(s) ADDR[,ADDR...], one VM each (how Propolis is used off illumos)")
	fs.StringVar(&o.PropolisBin, "propolis-bin", "propolis-server", "propolis-server binary (illumos host mode)")
	fs.StringVar(&o.PropolisBootrom, "propolis-bootrom", "", "UEFI bootrom (OVMF) for propolis-server (illumos host mode)")
	fs.StringVar(&o.PropolisZvolParent, "propolis-zvol-parent", "", "ZFS dataset for boot-disk zvols, e.g. rpool/vmherd (illumos host mode)")
	fs.StringVar(&o.PropolisLink, "propolis-link", "", "physical link to create VNICs over (illumos host mode)")
	fs.StringVar(&o.PropolisListenIP, "propolis-listen-ip", "127.0.0.1", "address the per-VM propolis-servers listen on, reachable from this worker")
	fs.IntVar(&o.PropolisPortBase, "propolis-port-base", 12400, "first port of the per-VM propolis-servers (a range of 200)")
}

func sanitizeHost(h string) string {
	h = strings.ToLower(h)
	var b strings.Builder
	for _, r := range h {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-', r == '_':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	s := strings.Trim(b.String(), "-_")
	if s == "" {
		return "localhost"
	}
	if len(s) > 63 {
		s = s[:63]
	}
	return s
}

// BuildRouter makes the backends the options enable.
func (o *WorkerOptions) BuildRouter(log *slog.Logger) (*backends.Router, error) {
	bs := map[api.BackendTag]backends.Hypervisor{}
	var order []api.BackendTag
	for _, name := range strings.Split(o.Backends, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		tag, err := api.ParseBackend(name)
		if err != nil {
			return nil, fmt.Errorf("--backends: %w", err)
		}
		b, err := o.buildBackend(tag, log)
		if err != nil {
			if o.DefaultBackend == "" && tag != api.BackendNoop {
				// An optional backend this machine cannot run: say so and go on.
				log.Warn("backend not available on this host", "backend", tag, "err", err)
				continue
			}
			return nil, fmt.Errorf("backend %s: %w", tag, err)
		}
		bs[tag] = b
		order = append(order, tag)
	}
	if len(bs) == 0 {
		return nil, fmt.Errorf("--backends %q enables no usable backend", o.Backends)
	}
	def := api.BackendTag(o.DefaultBackend)
	if def == "" {
		def = order[0]
		if _, ok := bs[api.BackendQEMU]; ok {
			def = api.BackendQEMU
		}
	}
	return backends.NewRouter(def, bs)
}

// imageStore is the worker's image store: <data-dir>/images.
func (o *WorkerOptions) imageStore() string {
	d := filepath.Join(o.DataDir, "images")
	if a, err := filepath.Abs(d); err == nil {
		d = a
	}
	return d
}

// imageRoots are --image-dir and the image store (<data-dir>/images),
// made absolute.
func (o *WorkerOptions) imageRoots() []string {
	dirs := append([]string{o.imageStore()}, o.ImageDirs...)
	out := make([]string, 0, len(dirs))
	for _, d := range dirs {
		if a, err := filepath.Abs(d); err == nil {
			d = a
		}
		out = append(out, d)
	}
	return out
}

// imagePolicy is what pulls may reach and take (--image-*).
func (o *WorkerOptions) imagePolicy() (images.Policy, error) {
	p := images.Policy{AllowPrivate: o.ImageAllowPrivate, AllowHTTPRegistry: o.ImageAllowHTTPRegistry, Timeout: o.ImagePullTimeout}
	if o.ImageMaxSize != "" {
		n, err := parseSize(o.ImageMaxSize)
		if err != nil {
			return p, fmt.Errorf("--image-max-size: %w", err)
		}
		p.MaxSize = n
	}
	if p.Timeout < 0 {
		return p, fmt.Errorf("--image-pull-timeout %s is negative", p.Timeout)
	}
	return p, nil
}

// parseSize reads a byte count: a number with an optional unit (B, KiB,
// MiB, GiB, TiB, or K, M, G, T, all powers of 1024).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return r < '0' || r > '9' })
	num, unit := t, ""
	if i >= 0 {
		num, unit = t[:i], strings.TrimSpace(t[i:])
	}
	shift, ok := map[string]uint{"": 0, "b": 0, "k": 10, "kib": 10, "m": 20, "mib": 20, "g": 30, "gib": 30, "t": 40, "tib": 40}[strings.ToLower(unit)]
	n, err := strconv.ParseInt(num, 10, 64)
	if !ok || err != nil || n <= 0 || n > math.MaxInt64>>shift {
		return 0, fmt.Errorf("%q is not a size such as 20GiB or 512MiB", s)
	}
	return n << shift, nil
}

// Connected bundles a NATS connection and its JetStream context.
type Connected struct {
	NC *nats.Conn
	JS jetstream.JetStream
}

// NewWorker builds a worker on an existing connection.
// It waits (logging what for) until the engine's streams and buckets exist,
// and never creates or changes them: their settings have one owner.
func (o *WorkerOptions) NewWorker(ctx context.Context, c Connected, names api.Names, log *slog.Logger) (*worker.Worker, error) {
	policy, err := o.imagePolicy()
	if err != nil {
		return nil, err
	}
	r, err := o.BuildRouter(log)
	if err != nil {
		return nil, err
	}
	var lo, hi int
	if o.MigrationPorts == "" {
		o.MigrationPorts = defaultMigrationPorts
	}
	if _, err := fmt.Sscanf(o.MigrationPorts, "%d-%d", &lo, &hi); err != nil || lo < 1 || hi > 65535 || lo > hi {
		return nil, fmt.Errorf("--migration-ports %q: want LO-HI, two ports with LO <= HI", o.MigrationPorts)
	}
	if err := waitStreams(ctx, c.JS, names, log); err != nil {
		return nil, err
	}
	var w *worker.Worker
	err = jsetup.RetryStartup(ctx, log, "the worker's task consumer", func(sctx context.Context) (err error) {
		w, err = worker.New(sctx, worker.Config{
			NC: c.NC, JS: c.JS, Names: names, Host: o.Host, Router: r, Log: log,
			Capacity:       api.Resources{Vcpus: o.CapacityVcpus, MemoryMB: o.CapacityMemMB},
			HeartbeatEvery: o.Heartbeat, AckWait: o.AckWait, Concurrency: o.Concurrency,
			ReconcileEvery: o.Reconcile, Metrics: o.Metrics,
			ImageRoots: o.imageRoots(), VMDirs: []string{filepath.Join(o.DataDir, "vms")}, ImageStore: o.imageStore(),
			ImagePolicy: policy,
			RelayLimits: relay.Limits{Tunnels: o.Tunnels, TunnelsPerRequester: o.TunnelsPerIdentity},
			Migration: worker.MigrationConfig{Listen: o.MigrationListen, PortLo: lo, PortHi: hi,
				Stall: o.MigrationStall, DowntimeMS: int(o.MigrationDowntime / time.Millisecond),
				BandwidthBps: o.MigrationBandwidth, SwitchDelay: o.MigrationSwitchDelay},
		})
		return err
	})
	return w, err
}

// defaultMigrationPorts is --migration-ports' default.
const defaultMigrationPorts = "49152-49215"

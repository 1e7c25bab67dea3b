// Package bench measures vmherd's lifecycle path against its limits:
// JetStream itself and QEMU itself. Every figure is taken next to a
// baseline measured in the same run on the same server, because the
// machines it runs on are shared and noisy. cmd/bench is its command.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"
)

// Options choose what runs and how long.
type Options struct {
	Quick   bool
	Out     string
	Only    []string
	Syncs   []string
	WorkDir string
	BinDir  string
	VMs     []int
	// Window lengths of figure 1 and 2.
	Warm, Measure, LoadFor time.Duration
	// IdleCommands and Gap shape the single idle VM of figure 2.
	IdleCommands  int
	Gap           time.Duration
	BaselineFor   time.Duration
	RebuildVMs    int
	ScaleVMs      int
	ScaleWindow   time.Duration
	QEMURounds    int
	MigrateRounds int
	ConsoleMiB    int
	Loads         []float64
	CPUProfile    string
	MemProfile    string
}

// Figures, by name (--only).
var Figures = []string{"throughput", "latency", "rebuild", "scale", "qemu", "console", "migrate"}

func (o *Options) want(fig string) bool { return len(o.Only) == 0 || slices.Contains(o.Only, fig) }

// defaults fills what the flags left unset, by mode.
func (o *Options) defaults() {
	set := func(d *time.Duration, quick, full time.Duration) {
		if *d == 0 {
			*d = map[bool]time.Duration{true: quick, false: full}[o.Quick]
		}
	}
	seti := func(n *int, quick, full int) {
		if *n == 0 {
			*n = map[bool]int{true: quick, false: full}[o.Quick]
		}
	}
	set(&o.Warm, time.Second, 2*time.Second)
	set(&o.Measure, 2*time.Second, 8*time.Second)
	set(&o.LoadFor, 2*time.Second, 8*time.Second)
	set(&o.BaselineFor, 1500*time.Millisecond, 4*time.Second)
	set(&o.Gap, 5*time.Millisecond, 5*time.Millisecond)
	set(&o.ScaleWindow, 2*time.Second, 5*time.Second)
	seti(&o.IdleCommands, 150, 600)
	seti(&o.RebuildVMs, 10_000, 100_000)
	seti(&o.ScaleVMs, 2_000, 10_000)
	seti(&o.QEMURounds, 1, 3)
	seti(&o.MigrateRounds, 5, 7)
	seti(&o.ConsoleMiB, 16, 64)
	if len(o.VMs) == 0 {
		o.VMs = []int{1, 10, 100, 1000}
	}
	if len(o.Loads) == 0 {
		o.Loads = []float64{100, 1000}
	}
	if len(o.Syncs) == 0 {
		o.Syncs = []string{"always", "default"}
	}
}

// SyncRun is figures 1 and 2 on one server with one durability setting.
type SyncRun struct {
	Sync string `json:"sync"`
	// AsyncPub is measured before and after the throughput series; the
	// ratios use their mean.
	AsyncPubBefore AsyncPub     `json:"async_pub_before"`
	AsyncPubAfter  AsyncPub     `json:"async_pub_after"`
	AsyncPubMean   float64      `json:"async_pub_mean_msgs_per_s"`
	Throughput     []Throughput `json:"throughput,omitempty"`
	// Bare is the bare pipeline (bare.go) at the largest VM count: the
	// ceiling JetStream sets for three durable writes per transition.
	Bare    *Throughput `json:"bare_pipeline,omitempty"`
	SyncPub Dist        `json:"sync_pub"`
	Latency []Latency   `json:"latency,omitempty"`
}

// Target is one of the goals and where it stands.
type Target struct {
	Name  string  `json:"name"`
	Goal  string  `json:"goal"`
	Value float64 `json:"value"`
	Shown string  `json:"shown"`
	Met   bool    `json:"met"`
}

// Report is the whole result (the JSON file).
type Report struct {
	Schema      string            `json:"schema"`
	Mode        string            `json:"mode"`
	Started     time.Time         `json:"started"`
	Seconds     float64           `json:"seconds"`
	Environment Environment       `json:"environment"`
	Method      map[string]string `json:"method"`
	Pipeline    []SyncRun         `json:"pipeline,omitempty"`
	Rebuild     *Rebuild          `json:"rebuild,omitempty"`
	Scale       *Scale            `json:"scale,omitempty"`
	QEMU        *QEMU             `json:"qemu,omitempty"`
	Console     *Console          `json:"console,omitempty"`
	Migrate     *Migrate          `json:"migrate,omitempty"`
	Targets     []Target          `json:"targets"`
	Failures    []string          `json:"failures,omitempty"`
}

// Main is cmd/bench.
func Main(args []string) int {
	var o Options
	fs := pflag.NewFlagSet("bench", pflag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "bench: measure vmherd's lifecycle path against JetStream and QEMU baselines\n\nUsage: go run ./cmd/bench [--quick] [--out bench-results.json]\n\n%s", fs.FlagUsages())
	}
	var vms, loads string
	fs.BoolVar(&o.Quick, "quick", false, "smaller and shorter runs (under 2 minutes)")
	fs.StringVar(&o.Out, "out", "bench-results.json", "machine-readable result file (JSON)")
	fs.StringSliceVar(&o.Only, "only", nil, "run only these figures: "+strings.Join(Figures, ","))
	fs.StringSliceVar(&o.Syncs, "sync", nil, `JetStream sync settings for figures 1 and 2 (default "always,default")`)
	fs.StringVar(&o.WorkDir, "work-dir", "", "where servers keep their stores (default: a temp dir, removed after)")
	fs.StringVar(&o.BinDir, "bin-dir", "", "directory with prebuilt engine and worker binaries (default: go build them)")
	fs.StringVar(&vms, "vms", "", "VM counts of figure 1 (default 1,10,100,1000)")
	fs.StringVar(&loads, "loads", "", "offered loads of figure 2 in commands/s (default 100,1000)")
	fs.DurationVar(&o.Measure, "measure", 0, "measured window of each figure 1 run (quick 2s, full 8s)")
	fs.IntVar(&o.RebuildVMs, "rebuild-vms", 0, "VMs in figure 3's stream, 10 events each (quick 10000, full 100000)")
	fs.IntVar(&o.ScaleVMs, "scale-vms", 0, "idle VMs of figure 4 (quick 2000, full 10000)")
	fs.DurationVar(&o.ScaleWindow, "scale-window", 0, "idle window of figure 4 (quick 2s, full 5s)")
	fs.IntVar(&o.QEMURounds, "qemu-rounds", 0, "rounds of figure 5 (quick 1, full 3)")
	fs.IntVar(&o.MigrateRounds, "migrate-rounds", 0, "rounds of figure 7 (quick 5, full 7)")
	fs.IntVar(&o.ConsoleMiB, "console-mib", 0, "MiB streamed in figure 6 (quick 16, full 64)")
	fs.StringVar(&o.CPUProfile, "cpuprofile", "", "write a CPU profile of figures 1 and 2 (engine, worker, server and client all run in this process), or of the whole run without them")
	fs.StringVar(&o.MemProfile, "memprofile", "", "write an allocation profile taken after figures 1 and 2")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		return 2
	}
	var err error
	if o.VMs, err = parseInts(vms); err != nil {
		fmt.Fprintf(os.Stderr, "bench: --vms: %v\n", err)
		return 2
	}
	ls, err := parseInts(loads)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: --loads: %v\n", err)
		return 2
	}
	for _, l := range ls {
		o.Loads = append(o.Loads, float64(l))
	}
	for _, f := range o.Only {
		if !slices.Contains(Figures, f) {
			fmt.Fprintf(os.Stderr, "bench: --only %q: not one of %s\n", f, strings.Join(Figures, ", "))
			return 2
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := Run(ctx, o, args, os.Stdout, os.Stderr)
	if rep != nil {
		if werr := writeJSON(o.Out, rep); werr != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", werr)
			return 1
		}
		fmt.Fprintf(os.Stdout, "\nresults written to %s\n", o.Out)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 1
	}
	if len(rep.Failures) > 0 {
		return 1
	}
	return 0
}

func parseInts(s string) ([]int, error) {
	if s == "" {
		return nil, nil
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a positive number", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func writeJSON(path string, rep *Report) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// Run runs the figures o asks for, printing progress to log and the
// tables to out. A figure that fails is recorded in Failures and the
// others still run.
func Run(ctx context.Context, o Options, args []string, out, log io.Writer) (*Report, error) {
	o.defaults()
	logf := func(f string, a ...any) { fmt.Fprintf(log, f+"\n", a...) }
	work := o.WorkDir
	if work == "" {
		d, err := os.MkdirTemp("", "vmherd-bench-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		work = d
	}
	work, _ = filepath.Abs(work)
	rep := &Report{
		Schema: "vmherd-bench/1", Mode: map[bool]string{true: "quick", false: "full"}[o.Quick],
		Started: time.Now().UTC(), Environment: environment(work, args), Method: methods(o),
	}
	fail := func(fig string, err error) {
		logf("bench: %s: %v", fig, err)
		rep.Failures = append(rep.Failures, fig+": "+err.Error())
	}

	// The CPU profile covers figures 1 and 2 when they run (the engine,
	// worker, server and client all run in this process), else the run.
	pipelineFigs := o.want("throughput") || o.want("latency")
	if o.CPUProfile != "" {
		f, err := os.Create(o.CPUProfile)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return nil, err
		}
		defer pprof.StopCPUProfile() // a no-op if stopped after figure 2
	}
	if pipelineFigs {
		for _, sync := range o.Syncs {
			r, err := pipelineFigures(ctx, o, sync, filepath.Join(work, "pipeline-"+sync), logf)
			if err != nil {
				fail("pipeline sync="+sync, err)
			}
			if r != nil {
				rep.Pipeline = append(rep.Pipeline, *r)
			}
		}
		if o.CPUProfile != "" {
			pprof.StopCPUProfile()
		}
		if o.MemProfile != "" {
			if f, err := os.Create(o.MemProfile); err == nil {
				_ = pprof.Lookup("allocs").WriteTo(f, 0)
				f.Close()
			}
		}
	}
	if o.want("rebuild") && ctx.Err() == nil {
		logf("figure 3: projection rebuild from %d events over %d VMs", o.RebuildVMs*len(rebuildSteps)*2, o.RebuildVMs)
		srv, err := startServer(filepath.Join(work, "rebuild"), "default")
		if err == nil {
			var r Rebuild
			r, err = rebuild(ctx, srv, o.RebuildVMs)
			srv.stop()
			rep.Rebuild = &r
		}
		if err != nil {
			fail("rebuild", err)
		}
	}
	if o.want("scale") && ctx.Err() == nil {
		logf("figure 4: engine and worker processes with %d idle VMs", o.ScaleVMs)
		r, err := scaleFigure(ctx, o, filepath.Join(work, "scale"), logf)
		if r != nil {
			rep.Scale = r
		}
		if err != nil {
			fail("scale", err)
		}
	}
	if o.want("qemu") && ctx.Err() == nil {
		logf("figure 5: QEMU operations through vmherd and directly (%d rounds)", o.QEMURounds)
		rep.Environment.QEMU = qemuVersion()
		srv, err := startServer(filepath.Join(work, "qemu-nats"), "always")
		if err == nil {
			var r QEMU
			qdir, derr := os.MkdirTemp("", "vbq") // QMP socket paths must stay short
			if derr != nil {
				err = derr
			} else {
				r, err = qemuBench(ctx, srv.url, qdir, o.QEMURounds, logf)
				os.RemoveAll(qdir)
			}
			srv.stop()
			rep.QEMU = &r
			if r.Skipped != "" {
				logf("  skipped: %s", r.Skipped)
			}
		}
		if err != nil {
			fail("qemu", err)
		}
	}
	if o.want("console") && ctx.Err() == nil {
		logf("figure 6: console and tunnel relay over NATS against the direct unix socket and TCP (%d MiB)", o.ConsoleMiB)
		srv, err := startServer(filepath.Join(work, "console-nats"), "default")
		if err == nil {
			var r Console
			cdir, derr := os.MkdirTemp("", "vbc") // unix socket paths must stay short
			if derr != nil {
				err = derr
			} else {
				r, err = consoleBench(ctx, srv.url, cdir, int64(o.ConsoleMiB)<<20, map[bool]int{true: 200, false: 1000}[o.Quick])
				os.RemoveAll(cdir)
			}
			srv.stop()
			rep.Console = &r
		}
		if err != nil {
			fail("console", err)
		}
	}
	if o.want("migrate") && ctx.Err() == nil {
		logf("figure 7: live migration between two hosts through vmherd and directly (%d rounds)", o.MigrateRounds)
		rep.Environment.QEMU = qemuVersion()
		srv, err := startServer(filepath.Join(work, "migrate-nats"), "always")
		if err == nil {
			var r Migrate
			mdir, derr := os.MkdirTemp("", "vbm") // QMP socket paths must stay short
			if derr != nil {
				err = derr
			} else {
				r, err = migrateBench(ctx, srv.url, mdir, o.MigrateRounds, logf)
				os.RemoveAll(mdir)
			}
			srv.stop()
			rep.Migrate = &r
			if r.Skipped != "" {
				logf("  skipped: %s", r.Skipped)
			}
		}
		if err != nil {
			fail("migrate", err)
		}
	}
	rep.Environment.LoadAvgAtEnd = loadAvg()
	rep.Seconds = time.Since(rep.Started).Seconds()
	rep.Targets = targets(rep)
	printReport(out, rep)
	return rep, ctx.Err()
}

// pipelineFigures runs figures 1 and 2 against one server.
func pipelineFigures(ctx context.Context, o Options, sync, dir string, logf func(string, ...any)) (*SyncRun, error) {
	logf("figures 1 and 2 with sync %q", sync)
	srv, err := startServer(dir, sync)
	if err != nil {
		return nil, err
	}
	defer srv.stop()
	p, err := startPipeline(ctx, pipelineConfig{URL: srv.url, StateDir: filepath.Join(dir, "engine")})
	if err != nil {
		return nil, err
	}
	defer p.close()
	cl, err := newClient(ctx, srv.url)
	if err != nil {
		return nil, err
	}
	defer cl.close()
	bnc, bjs, err := connect(srv.url, "bench-baseline")
	if err != nil {
		return nil, err
	}
	defer bnc.Close()
	size := eventSize()
	r := &SyncRun{Sync: sync}
	tag := map[string]string{"always": "a", "default": "d"}[sync]
	if tag == "" {
		tag = "x"
	}

	if o.want("latency") {
		if r.SyncPub, err = syncPubLatency(ctx, bjs, size, o.IdleCommands, o.Gap); err != nil {
			return r, err
		}
		logf("  sync publish round trip: p50 %.2fms p99 %.2fms", r.SyncPub.P50, r.SyncPub.P99)
		l, err := idleVM(ctx, cl, "l"+tag+"-idle", o.IdleCommands, o.Gap)
		if err != nil {
			return r, err
		}
		r.Latency = append(r.Latency, l)
		logf("  1 idle VM: p50 %.2fms p99 %.2fms max %.2fms", l.Latency.P50, l.Latency.P99, l.Latency.Max)
		for _, rate := range o.Loads {
			pool := max(16, int(rate/4))
			l, err := openLoop(ctx, cl, fmt.Sprintf("l%s-r%d", tag, int(rate)), rate, pool, o.LoadFor)
			if err != nil {
				return r, err
			}
			r.Latency = append(r.Latency, l)
			logf("  %.0f commands/s offered (%.0f achieved): p50 %.2fms p99 %.2fms max %.2fms", rate, l.AchievedPer, l.Latency.P50, l.Latency.P99, l.Latency.Max)
		}
		for i := range r.Latency {
			r.Latency[i].Baseline = r.SyncPub
			r.Latency[i].RatioP50 = ratio(r.Latency[i].Latency.P50, r.SyncPub.P50)
			r.Latency[i].RatioP99 = ratio(r.Latency[i].Latency.P99, r.SyncPub.P99)
		}
	}
	if o.want("throughput") {
		if r.AsyncPubBefore, err = asyncPubRate(ctx, bjs, srv, size, o.BaselineFor); err != nil {
			return r, err
		}
		logf("  async publish (%d B): %.0f msgs/s", size, r.AsyncPubBefore.MsgsPerS)
		for _, n := range o.VMs {
			t, err := throughput(ctx, cl, srv, fmt.Sprintf("t%s-%d", tag, n), n, o.Warm, o.Measure)
			if err != nil {
				return r, err
			}
			r.Throughput = append(r.Throughput, t)
			logf("  %d VMs: %.0f transitions/s (p50 %.1fms p99 %.1fms, %d errors)", n, t.PerS, t.Latency.P50, t.Latency.P99, t.Errors)
			runtime.GC()
		}
		if len(o.VMs) > 0 {
			b, err := barePipeline(ctx, srv, size, slices.Max(o.VMs), o.Warm, o.Measure)
			if err != nil {
				return r, err
			}
			r.Bare = &b
			logf("  bare pipeline, %d VMs: %.0f transitions/s (p50 %.1fms p99 %.1fms)", b.VMs, b.PerS, b.Latency.P50, b.Latency.P99)
			runtime.GC()
		}
		if r.AsyncPubAfter, err = asyncPubRate(ctx, bjs, srv, size, o.BaselineFor); err != nil {
			return r, err
		}
		logf("  async publish again: %.0f msgs/s", r.AsyncPubAfter.MsgsPerS)
		r.AsyncPubMean = (r.AsyncPubBefore.MsgsPerS + r.AsyncPubAfter.MsgsPerS) / 2
		runs := make([]*Throughput, 0, len(r.Throughput)+1)
		for i := range r.Throughput {
			runs = append(runs, &r.Throughput[i])
		}
		if r.Bare != nil {
			runs = append(runs, r.Bare)
		}
		for _, t := range runs {
			t.BaselineMsgsS = r.AsyncPubMean
			t.Ratio = ratio(t.PerS, r.AsyncPubMean)
		}
	}
	return r, nil
}

func scaleFigure(ctx context.Context, o Options, dir string, logf func(string, ...any)) (*Scale, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	bin := o.BinDir
	if bin == "" {
		bin = filepath.Join(dir, "bin")
		logf("  building cmd/engine and cmd/worker")
		if err := buildBinaries(ctx, bin); err != nil {
			return nil, err
		}
	}
	srv, err := startServer(filepath.Join(dir, "nats"), "default")
	if err != nil {
		return nil, err
	}
	defer srv.stop()
	r, err := scale(ctx, srv, bin, dir, o.ScaleVMs, o.ScaleWindow, logf)
	return &r, err
}

package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmherd/vmherd/internal/testenv/require"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times (100 on every
// Linux architecture Go supports).
const clockTicks = 100

// ProcUsage is one process's resource use at one moment or over a window.
type ProcUsage struct {
	RSSKiB int64 `json:"rss_kib"`
	HWMKiB int64 `json:"rss_peak_kib"`
	// HeapLiveMiB is the Go heap live after the process's last GC (from
	// GODEBUG=gctrace=1), -1 if unknown.
	HeapLiveMiB float64 `json:"heap_live_after_last_gc_mib"`
	// CPUPct is the process's CPU time over the window, in % of one core.
	CPUPct float64 `json:"cpu_pct_of_one_core"`
}

// ScaleProc is figure 4 for one process.
type ScaleProc struct {
	Idle0 ProcUsage `json:"idle_0_vms"`
	IdleN ProcUsage `json:"idle_n_vms"`
	// PerVMBytes is (RSS with n VMs - RSS with 0) / n.
	PerVMBytes float64 `json:"rss_bytes_per_vm"`
	// HeapPerVMBytes is the same from the live heap after GC.
	HeapPerVMBytes float64 `json:"heap_bytes_per_vm"`
	// PrepareCPUms is the CPU the process used to prepare the n VMs.
	PrepareCPUms float64 `json:"prepare_cpu_ms"`
	PrepareCPUus float64 `json:"prepare_cpu_us_per_vm"`
}

// Scale is figure 4.
type Scale struct {
	VMs            int       `json:"vms"`
	PrepareSeconds float64   `json:"prepare_seconds"`
	PreparePerS    float64   `json:"prepares_per_s"`
	IdleWindowS    float64   `json:"idle_window_seconds"`
	Errors         int64     `json:"errors"`
	Engine         ScaleProc `json:"engine"`
	Worker         ScaleProc `json:"worker"`
}

// proc is a vmherd binary running as its own process.
type proc struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func startProc(ctx context.Context, bin, logPath string, args ...string) (*proc, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "GODEBUG=gctrace=1")
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	p := &proc{cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); f.Close(); close(p.done) }()
	return p, nil
}

// waitLog waits until the process logged s.
func (p *proc) waitLog(s string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		b, _ := os.ReadFile(p.log)
		if strings.Contains(string(b), s) {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before logging %q:\n%s", p.cmd.Path, s, lastN(string(b), 2000))
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not log %q within %s:\n%s", p.cmd.Path, s, d, lastN(string(b), 2000))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func lastN(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// stop sends SIGTERM and waits, then SIGKILL.
func (p *proc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

// cpuTicks is utime+stime of the process.
func (p *proc) cpuTicks() (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("unexpected /proc stat format")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, errors.New("unexpected /proc stat format")
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14
	st, _ := strconv.ParseInt(f[12], 10, 64) // field 15
	return ut + st, nil
}

// memory reads VmRSS and VmHWM from /proc/<pid>/status.
func (p *proc) memory() (rss, hwm int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			rss = n
		case "VmHWM":
			hwm = n
		}
	}
	return rss, hwm, nil
}

var gcLine = regexp.MustCompile(`gc \d+ @.*?(\d+)->(\d+)->(\d+) MB`)

// heapLive is the live heap after the last GC the process traced.
func (p *proc) heapLive() float64 {
	f, err := os.Open(p.log)
	if err != nil {
		return -1
	}
	defer f.Close()
	live := -1.0
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		if m := gcLine.FindStringSubmatch(s.Text()); m != nil {
			live, _ = strconv.ParseFloat(m[3], 64)
		}
	}
	return live
}

// usage measures p over window: CPU over it, memory at its end.
func usageOver(ps []*proc, window time.Duration) ([]ProcUsage, error) {
	t0 := make([]int64, len(ps))
	for i, p := range ps {
		var err error
		if t0[i], err = p.cpuTicks(); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	time.Sleep(window)
	secs := time.Since(start).Seconds()
	out := make([]ProcUsage, len(ps))
	for i, p := range ps {
		t1, err := p.cpuTicks()
		if err != nil {
			return nil, err
		}
		rss, hwm, err := p.memory()
		if err != nil {
			return nil, err
		}
		out[i] = ProcUsage{RSSKiB: rss, HWMKiB: hwm, HeapLiveMiB: p.heapLive(),
			CPUPct: 100 * float64(t1-t0[i]) / clockTicks / secs}
	}
	return out, nil
}

// buildBinaries builds cmd/engine and cmd/worker into dir.
func buildBinaries(ctx context.Context, dir string) error {
	root, err := require.RepoRoot()
	if err != nil {
		return fmt.Errorf("%w, or pass --bin-dir", err)
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+"/", "./cmd/engine", "./cmd/worker")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building cmd/engine and cmd/worker: %v\n%s", err, out)
	}
	return nil
}

// scale runs the engine and a worker as their own processes against srv,
// measures them idle with no VMs, prepares n VMs on the Noop backend and
// measures them idle again.
func scale(ctx context.Context, srv *server, binDir, dir string, n int, window time.Duration, logf func(string, ...any)) (Scale, error) {
	res := Scale{VMs: n, IdleWindowS: window.Seconds()}
	host := "scale1"
	// The engine first: it creates the streams and buckets, which the
	// worker waits for.
	en, err := startProc(ctx, filepath.Join(binDir, "engine"), filepath.Join(dir, "engine.log"),
		"--nats-url", srv.url, "--data-dir", filepath.Join(dir, "engine"), "--engine-id", "scale", "--log-level", "info")
	if err != nil {
		return res, err
	}
	defer en.stop()
	if err := en.waitLog("engine serving", time.Minute); err != nil {
		return res, err
	}
	wk, err := startProc(ctx, filepath.Join(binDir, "worker"), filepath.Join(dir, "worker.log"),
		"--nats-url", srv.url, "--host", host, "--data-dir", filepath.Join(dir, "worker"),
		"--backends", "noop", "--default-backend", "noop", "--log-level", "info",
		"--capacity-memory-mb", strconv.Itoa(1<<30), "--capacity-vcpus", strconv.Itoa(1<<20))
	if err != nil {
		return res, err
	}
	defer wk.stop()
	if err := wk.waitLog("worker serving", time.Minute); err != nil {
		return res, err
	}
	cl, err := newClient(ctx, srv.url)
	if err != nil {
		return res, err
	}
	defer cl.close()
	// A VM through prepare and destroy proves the pipeline works end to end.
	probe := newCycler("probe")
	for _, want := range []string{"prepare", "destroy"} {
		deadline := time.Now().Add(30 * time.Second)
		for {
			action, id := probe.next()
			if action != want {
				probe.step = len(lifecycle) - 1
				action = "destroy"
			}
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			_, o, err := cl.do(cctx, probe.name, action, id)
			cancel()
			if err != nil {
				return res, err
			}
			if o.ok() {
				probe.done(o)
				break
			}
			if time.Now().After(deadline) {
				return res, fmt.Errorf("probe %s: %s: %s", action, o.Type, o.Reason)
			}
			time.Sleep(200 * time.Millisecond) // the engine may not see the host yet
		}
	}
	time.Sleep(window / 2) // settle
	ps := []*proc{en, wk}
	u0, err := usageOver(ps, window)
	if err != nil {
		return res, err
	}

	c0 := make([]int64, 2)
	for i, p := range ps {
		c0[i], _ = p.cpuTicks()
	}
	logf("  preparing %d VMs on the engine and worker processes", n)
	start := time.Now()
	sem := make(chan struct{}, 256)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			name := fmt.Sprintf("sc-%05d", i)
			cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
			defer cancel()
			_, o, err := cl.do(cctx, name, "prepare", name+"-1")
			mu.Lock()
			defer mu.Unlock()
			if err != nil && firstErr == nil {
				firstErr = err
			}
			if err == nil && !o.ok() {
				res.Errors++
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return res, firstErr
	}
	res.PrepareSeconds = time.Since(start).Seconds()
	res.PreparePerS = float64(n) / res.PrepareSeconds
	c1 := make([]int64, 2)
	for i, p := range ps {
		c1[i], _ = p.cpuTicks()
	}
	time.Sleep(window / 2) // settle
	un, err := usageOver(ps, window)
	if err != nil {
		return res, err
	}
	for i, sp := range []*ScaleProc{&res.Engine, &res.Worker} {
		sp.Idle0, sp.IdleN = u0[i], un[i]
		sp.PerVMBytes = float64(un[i].RSSKiB-u0[i].RSSKiB) * 1024 / float64(n)
		if u0[i].HeapLiveMiB >= 0 && un[i].HeapLiveMiB >= 0 {
			sp.HeapPerVMBytes = (un[i].HeapLiveMiB - u0[i].HeapLiveMiB) * (1 << 20) / float64(n)
		}
		sp.PrepareCPUms = float64(c1[i]-c0[i]) * 1000 / clockTicks
		sp.PrepareCPUus = sp.PrepareCPUms * 1000 / float64(n)
	}
	return res, nil
}

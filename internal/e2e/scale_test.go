package e2e_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/testenv"
)

// vmctl at a CI system's rate (issue #27): thousands of vmctl processes
// against one engine (embedded NATS, its credentials, a Noop worker),
// create, start, status, history and destroy, with and without --no-wait,
// in parallel. Every one must succeed within two minutes, and the
// consumers on every stream stay within jsetup.ConsumerBound, during the
// run, at its end and 10 s later: vmctl leaves nothing on the server.
// Before, each vmctl that waited or read events left an ordered consumer
// on VM_EVENTS for 5 minutes, and at 1,000 of them the server refused
// more (vmctl and the engine's own look-ups failed).
//
// It is bound by the CPU the vmctl processes take, most of it their
// start-up (about 25 ms each here): it takes 1.5 to 2 minutes on two
// cores, so it runs on its own, not in parallel with other tests.
func TestVmctlAtCIRate(t *testing.T) {
	const (
		vms      = 600 // × 5 commands: 3,000 vmctl
		parallel = 32  // vmctl processes at once
		budget   = 2 * time.Minute
	)
	bin := testenv.PlainBinaries(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	port := testenv.FreePort(t)
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	eng := testenv.StartProc(t, "engine", filepath.Join(bin, "engine"), []string{
		"VMHERD_DATA_DIR=" + data,
		"VMHERD_LISTEN=" + testenv.Addr(port),
		"VMHERD_BACKENDS=noop",
		"VMHERD_HOST=box1",
		// One identity (admin) sends every command: its rate limit
		// (50/s by default) would reject most of them.
		"VMHERD_COMMAND_RATE=0",
	}, "--with-worker")
	eng.WaitLog("engine serving", 60*time.Second)
	env := testenv.AttachCreds(t, url, filepath.Join(data, "auth", "admin.creds"))
	bound := jsetup.ConsumerBound(env.Names, 1, 1)
	env.WaitFor("the worker's task consumer", 30*time.Second, func() bool {
		return env.ConsumerCounts()[env.Names.TasksStream()] == 1
	})
	checkLimits(t, env)

	// Sample the consumers while the commands run.
	peak := map[string]int{}
	sampling, stopSampling := context.WithCancel(context.Background())
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for sampling.Err() == nil {
			for s, n := range consumerCounts(sampling, env) {
				peak[s] = max(peak[s], n)
			}
			select {
			case <-sampling.Done():
			case <-time.After(500 * time.Millisecond):
			}
		}
	}()

	var (
		mu       sync.Mutex
		ran      int
		failures []string
	)
	run := func(args []string) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "vmctl"), args...)
		cmd.Env = append(os.Environ(), "NATS_URL="+url, "VMHERD_DATA_DIR="+data)
		out, err := cmd.CombinedOutput()
		mu.Lock()
		defer mu.Unlock()
		ran++
		if err != nil {
			failures = append(failures, fmt.Sprintf("vmctl %s: %v\n%s", strings.Join(args, " "), err, out))
		}
	}
	// phase runs one command per VM, parallel at a time.
	phase := func(what string, args func(i int) []string) {
		start := time.Now()
		jobs := make(chan int)
		var wg sync.WaitGroup
		for range parallel {
			wg.Go(func() {
				for i := range jobs {
					run(args(i))
				}
			})
		}
		for i := range vms {
			jobs <- i
		}
		close(jobs)
		wg.Wait()
		t.Logf("%-18s %d vmctl in %s", what, vms, time.Since(start).Round(time.Millisecond))
	}
	name := func(i int) string { return fmt.Sprintf("ci%04d", i) }
	noWait := func(i int, args ...string) []string {
		if i%2 == 1 {
			return append([]string{"--no-wait"}, args...)
		}
		return args
	}
	// Between phases, the --no-wait half's commands must have ended (a
	// start on a VM still preparing is rejected by the state machine).
	settled := func(want api.VmState) bool {
		deadline := time.Now().Add(time.Minute)
		for time.Now().Before(deadline) {
			recs, err := projection.Load(context.Background(), env.JS, env.Names)
			done := err == nil
			for i := 0; done && i < vms; i++ {
				r := recs[name(i)]
				done = r != nil && r.State == want && len(r.InFlight) == 0
			}
			if done {
				return true
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Errorf("not every VM %s within a minute", want)
		return false
	}
	// Half the VMs get status then history, the other half the reverse.
	read := func(first, second string) func(i int) []string {
		return func(i int) []string {
			if i%2 == 0 {
				return []string{first, name(i)}
			}
			return []string{second, name(i)}
		}
	}
	phases := []struct {
		what string
		args func(i int) []string
		then api.VmState // what every VM is once the phase's commands ended
	}{
		{"create", func(i int) []string { return noWait(i, "create", name(i), "--backend", "noop") }, api.StatePrepared},
		{"start", func(i int) []string { return noWait(i, "start", name(i)) }, api.StateRunning},
		{"status|history", read("status", "history"), ""},
		{"history|status", read("history", "status"), ""},
		{"destroy", func(i int) []string { return noWait(i, "destroy", name(i)) }, api.StateDestroyed},
	}
	began := time.Now()
	for _, p := range phases {
		phase(p.what, p.args)
		if p.then != "" && !settled(p.then) {
			break
		}
	}
	took := time.Since(began)
	stopSampling()
	<-sampled

	if len(failures) > 0 {
		t.Errorf("%d of %d vmctl failed; the first:\n%s", len(failures), ran, strings.Join(failures[:min(3, len(failures))], "\n"))
	}
	t.Logf("%d vmctl in %s (%.0f/s)", ran, took.Round(time.Millisecond), float64(ran)/took.Seconds())
	if ran < 3000 || took > budget {
		t.Errorf("%d vmctl in %s; want at least 3000 within %s", ran, took.Round(time.Millisecond), budget)
	}
	report := func(when string, counts map[string]int) {
		line := fmt.Sprintf("CONSUMERS %s: %s (bound %s)", when, formatCounts(counts), formatCounts(bound))
		t.Log(line)
		fmt.Println(line)
		for s, n := range counts {
			if b, ok := bound[s]; !ok || n > b {
				t.Errorf("%s: %d consumers on %s, bound %d", when, n, s, b)
			}
		}
	}
	report("peak during the run", peak)
	report(fmt.Sprintf("at the end (after %d vmctl)", ran), env.ConsumerCounts())
	time.Sleep(10 * time.Second)
	report("10 s later", env.ConsumerCounts())
	c := env.CheckStreams()
	if c.Accepted != 3*vms || c.Rejected != 0 || c.Lost != 0 || c.Duplicates != 0 {
		t.Errorf("streams: %s; want %d accepted, none rejected, lost or twice", c, 3*vms)
	}
	if err := eng.Term(60 * time.Second); err != nil {
		t.Fatalf("engine did not stop cleanly: %v\n%s", err, eng.Output())
	}
}

// checkLimits checks that the streams carry the consumer limits
// docs/architecture.md states.
func checkLimits(t *testing.T, env *testenv.Env) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	want := map[string]int{
		env.Names.CommandsStream(): jsetup.MaxConsumers.Commands,
		env.Names.EventsStream():   jsetup.MaxConsumers.Events,
		env.Names.TasksStream():    jsetup.MaxConsumers.Tasks,
	}
	for name, n := range want {
		st, err := env.JS.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.CachedInfo().Config.MaxConsumers; got != n {
			t.Errorf("%s: max consumers %d, want %d", name, got, n)
		}
	}
}

// consumerCounts is testenv's ConsumerCounts without failing the test
// (for a goroutine): nil on an error.
func consumerCounts(ctx context.Context, env *testenv.Env) map[string]int {
	out := map[string]int{}
	l := env.JS.ListStreams(ctx)
	for info := range l.Info() {
		out[info.Config.Name] = info.State.Consumers
	}
	if l.Err() != nil {
		return nil
	}
	return out
}

func formatCounts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	return strings.Join(parts, " ")
}

// 100 Noop VMs prepared at once on 10 equal hosts (Noop VMs take no
// capacity, so every host ties on free memory) end up 10 ± 2 on each.
// Before, ties went to the first host by name: all 100 on h00.
func TestPlacementSpreadsEqualHosts(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	hostNames := make([]string, 10)
	for i := range hostNames {
		hostNames[i] = fmt.Sprintf("h%02d", i)
		env.StartWorker(testenv.WorkerConfig{Host: hostNames[i]})
	}
	for _, h := range hostNames {
		env.WaitHost(eng, h)
	}
	const n = 100
	for i := range n {
		env.SendCmd(fmt.Sprintf("s%03d", i), "prepare", fmt.Sprintf("p%03d", i), api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	}
	per := map[string]int{}
	for i := range n {
		ev := env.Result(fmt.Sprintf("s%03d", i), fmt.Sprintf("p%03d", i), 60*time.Second)
		if ev.Type != api.TypePrepared {
			t.Fatalf("s%03d: %s %s", i, ev.Type, ev.Reason+ev.Error)
		}
		per[ev.Host]++
	}
	t.Logf("VMs per host: %v", per)
	for _, h := range hostNames {
		if per[h] < 8 || per[h] > 12 {
			t.Errorf("host %s has %d VMs, want 10 ± 2 (all: %v)", h, per[h], per)
		}
	}
}

package vmctl

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
)

// result is one vmctl run.
type result struct {
	code     int
	out, err string
	took     time.Duration
}

func (r result) String() string {
	return fmt.Sprintf("exit %d after %s\nstdout:\n%sstderr:\n%s", r.code, r.took.Round(time.Millisecond), r.out, r.err)
}

// vmctl runs the CLI in-process against url (empty: a closed port).
func vmctl(t *testing.T, ctx context.Context, url string, args ...string) result {
	t.Helper()
	if url == "" {
		url = "nats://" + testenv.Addr(testenv.FreePort(t))
	}
	var out, errOut syncbuf.Buffer
	start := time.Now()
	code := Run(ctx, append([]string{"--server", url}, args...), &out, &errOut)
	return result{code: code, out: out.String(), err: errOut.String(), took: time.Since(start)}
}

// pipeline is an embedded NATS server, an engine and a Noop worker h1.
func pipeline(t *testing.T, nb *noop.Backend) (*testenv.Env, *testenv.Part) {
	t.Helper()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb})
	env.WaitHost(eng, "h1")
	return env, eng
}

func TestUsageErrorsExitTwo(t *testing.T) {
	t.Parallel()
	notFile := t.TempDir()
	priv := filepath.Join(t.TempDir(), "id_ed25519")
	if err := os.WriteFile(priv, []byte("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n-----END OPENSSH PRIVATE KEY-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		want []string // in stderr
		not  []string
	}{
		{[]string{"start", "--bogus", "web1"}, []string{"unknown flag: --bogus", "--help"}, nil},
		{[]string{"start"}, []string{"exactly one VM name"}, nil},
		{[]string{"start", "a", "b"}, []string{"exactly one VM name"}, nil},
		{[]string{"frobnicate"}, []string{`unknown command "frobnicate"`}, nil},
		{[]string{"start", "Web1"}, []string{`NAME "Web1"`, "lowercase"}, nil},
		{[]string{"create", "web1", "--memory", "lots"}, []string{`--memory "lots": want a whole number`}, []string{"strconv", "ParseInt"}},
		{[]string{"create", "web1", "--memory", "10"}, []string{"--memory: 10 is out of range"}, []string{"memory_mb"}},
		{[]string{"create", "web1", "--vcpus", "0"}, []string{"--vcpus: 0 is out of range"}, []string{"spec."}},
		{[]string{"create", "web1", "--backend", "qemu"}, []string{"--image: is required for the qemu backend"}, []string{"image_path"}},
		{[]string{"create", "web1", "--network", "tap:bad/br"}, []string{"--bridge"}, []string{"spec."}},
		{[]string{"create", "web1", "--start", "--no-wait"}, []string{"--start with --no-wait", "vmctl start web1"}, nil},
		{[]string{"create", "web1", "--ssh-key", "ssh-ed25519 AAAAC3 me@x"}, []string{"--ssh-key", "public key file"}, nil},
		{[]string{"create", "web1", "--ssh-key", notFile}, []string{"is not a regular file"}, nil},
		{[]string{"create", "web1", "--ssh-key", priv}, []string{"is a private key", priv + ".pub"}, nil},
		{[]string{"stop", "web1", "--stop-timeout", "30"}, []string{`--stop-timeout "30"`, "with its unit"}, []string{"time: "}},
		{[]string{"destroy", "web1", "--stop-timeout", "500ms"}, []string{"--stop-timeout 500ms"}, nil},
		{[]string{"log", "web1", "--tail", "x"}, []string{`--tail "x": want a whole number`}, nil},
	} {
		r := vmctl(t, context.Background(), "", c.args...)
		if r.code != ExitUsage {
			t.Errorf("vmctl %q: want exit 2, got %v", c.args, r)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(r.err, w) {
				t.Errorf("vmctl %q: stderr lacks %q:\n%s", c.args, w, r.err)
			}
		}
		for _, n := range c.not {
			if strings.Contains(r.err, n) {
				t.Errorf("vmctl %q: stderr names the wire field %q:\n%s", c.args, n, r.err)
			}
		}
	}
}

func TestVersionAndCompletionWithoutServer(t *testing.T) {
	t.Parallel()
	r := vmctl(t, context.Background(), "", "--version")
	if r.code != 0 || !strings.HasPrefix(r.out, "vmctl ") {
		t.Fatalf("--version: %v", r)
	}
	r = vmctl(t, context.Background(), "", "completion", "bash")
	if r.code != 0 || !strings.Contains(r.out, "__start_vmctl") {
		t.Fatalf("completion bash: %v", r)
	}
}

// With no engine deciding commands, vmctl says so at once and sends
// nothing; with --no-wait it stores the command and warns.
func TestNoEngineAnsweredAtOnce(t *testing.T) {
	t.Parallel()
	env := testenv.New(t) // streams exist, no engine has run
	ctx := context.Background()
	r := vmctl(t, ctx, env.URL, "start", "web1")
	if r.code != ExitNoResult || !strings.Contains(r.err, "no engine has ever consumed") || !strings.Contains(r.err, "nothing was sent") {
		t.Fatalf("no engine ever: %v", r)
	}
	if r.took > 2*time.Second {
		t.Fatalf("no-engine answer took %s", r.took)
	}
	if n := len(env.Events("web1")); n != 0 {
		t.Fatalf("%d events stored for a command that was not sent", n)
	}

	// An engine that ran and stopped leaves its consumer without pulls.
	eng := env.StartEngine(testenv.EngineConfig{})
	env.WaitFor("engine pulling", 10*time.Second, func() bool {
		c, err := env.JS.Consumer(ctx, env.Names.CommandsStream(), env.Names.CommandConsumer())
		return err == nil && c.CachedInfo().NumWaiting > 0
	})
	if err := eng.Stop(); err != nil {
		t.Fatal(err)
	}
	r = vmctl(t, ctx, env.URL, "create", "web1", "--backend", "noop")
	if r.code != ExitNoResult || !strings.Contains(r.err, "no active pull request") || !strings.Contains(r.err, "start the engine") {
		t.Fatalf("engine stopped: %v", r)
	}
	if r.took > 2*time.Second {
		t.Fatalf("no-engine answer took %s", r.took)
	}

	r = vmctl(t, ctx, env.URL, "--no-wait", "create", "web1", "--backend", "noop")
	if r.code != 0 || !strings.Contains(r.err, "warning") || !strings.Contains(r.out, "stored as command") {
		t.Fatalf("--no-wait without engine: %v", r)
	}
	id := regexp.MustCompile(`command (vmctl-[0-9a-f]+)`).FindStringSubmatch(r.out)
	if id == nil {
		t.Fatalf("no command id in %q", r.out)
	}
	// The stored command is decided once an engine runs again.
	// The worker's first heartbeat is stored before the engine starts, so
	// the stored prepare finds a host when it is decided.
	env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	hostsKV, err := env.JS.KeyValue(ctx, env.Names.HostsBucket())
	if err != nil {
		t.Fatal(err)
	}
	env.WaitFor("h1's first heartbeat", 20*time.Second, func() bool {
		_, err := hostsKV.Get(ctx, "h1")
		return err == nil
	})
	env.StartEngine(testenv.EngineConfig{ID: "e2"})
	if ev := env.Decision("web1", id[1], 30*time.Second); ev.Type != api.TypeAccepted {
		t.Fatalf("stored command after the engine came back: %+v", ev)
	}

	// No NATS at all: a quick, clear failure.
	r = vmctl(t, ctx, "", "list")
	if r.code != ExitNoResult || !strings.Contains(r.err, "is the engine running?") || r.took > 3*time.Second {
		t.Fatalf("no server: %s in %v", r, r.took)
	}
}

// Ctrl-C or --timeout after the command was stored: vmctl says it is
// stored and will still be applied, with its id and how to watch it; and it
// is applied.
func TestInterruptAndTimeoutAfterStore(t *testing.T) {
	t.Parallel()
	nb := noop.New(noop.Options{CallLatency: map[string]time.Duration{"start": 3 * time.Second}})
	env, _ := pipeline(t, nb)
	ctx := context.Background()
	if r := vmctl(t, ctx, env.URL, "create", "web1", "--backend", "noop"); r.code != 0 {
		t.Fatalf("create: %v", r)
	}

	// Ctrl-C once accepted.
	cctx, cancel := context.WithCancel(ctx)
	var out, errOut syncbuf.Buffer
	done := make(chan int, 1)
	go func() {
		done <- Run(cctx, []string{"--server", env.URL, "--progress", "always", "start", "web1"}, &out, &errOut)
	}()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), "accepted on host h1") {
		if time.Now().After(deadline) {
			t.Fatalf("start never accepted:\n%s%s", out.String(), errOut.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Progress on the "terminal": what it waits for, since when.
	for !strings.Contains(errOut.String(), "waiting for the result from the worker on host h1 since") {
		if time.Now().After(deadline) {
			t.Fatalf("no progress shown:\n%s", errOut.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	code := <-done
	msg := errOut.String()
	id := regexp.MustCompile(`command (vmctl-[0-9a-f]+)`).FindStringSubmatch(msg)
	if code != ExitInterrupted || !strings.Contains(msg, "interrupted: start web1 was accepted") ||
		!strings.Contains(msg, "will still be carried out") || !strings.Contains(msg, "vmctl events web1 --follow") || id == nil {
		t.Fatalf("Ctrl-C after store: exit %d\n%s", code, msg)
	}
	if ev := env.Result("web1", id[1], 30*time.Second); ev.Type != api.TypeStarted {
		t.Fatalf("the interrupted command's result: %+v", ev)
	}

	// --timeout shorter than the call.
	if r := vmctl(t, ctx, env.URL, "stop", "web1"); r.code != 0 {
		t.Fatalf("stop: %v", r)
	}
	r := vmctl(t, ctx, env.URL, "--timeout", "1s", "start", "web1")
	id = regexp.MustCompile(`command (vmctl-[0-9a-f]+)`).FindStringSubmatch(r.err)
	if r.code != ExitNoResult || !strings.Contains(r.err, "no result within --timeout 1s") || !strings.Contains(r.err, "will still be") || id == nil {
		t.Fatalf("--timeout: %v", r)
	}
	if ev := env.Result("web1", id[1], 30*time.Second); ev.Type != api.TypeStarted {
		t.Fatalf("the timed-out command's result: %+v", ev)
	}
}

// --start with --no-wait is refused before anything is stored.
func TestCreateStartNoWaitStoresNothing(t *testing.T) {
	t.Parallel()
	env, _ := pipeline(t, nil)
	r := vmctl(t, context.Background(), env.URL, "--no-wait", "create", "web1", "--backend", "noop", "--start")
	if r.code != ExitUsage {
		t.Fatalf("create --start --no-wait: %v", r)
	}
	if n := len(env.Events("web1")); n != 0 {
		t.Fatalf("%d events stored", n)
	}
}

func TestNeverExistedSaysNoVM(t *testing.T) {
	t.Parallel()
	env, _ := pipeline(t, nil)
	for _, action := range []string{"start", "stop", "destroy"} {
		r := vmctl(t, context.Background(), env.URL, action, "ghost")
		if r.code != ExitFailed || !strings.HasPrefix(r.err, "vmctl: no VM named ghost") {
			t.Fatalf("%s ghost: %v", action, r)
		}
	}
	for _, q := range []string{"status", "ip", "log"} {
		r := vmctl(t, context.Background(), env.URL, q, "ghost")
		if r.code != ExitFailed || !strings.HasPrefix(r.err, "vmctl: no VM named ghost") {
			t.Fatalf("%s ghost: %v", q, r)
		}
	}
}

// A VM killed outside vmherd shows as exited, not as a clean stop; ip and
// status of a VM that does not run say so instead of a stale forward.
func TestCrashedAndNotRunning(t *testing.T) {
	t.Parallel()
	nb := noop.New(noop.Options{})
	env, _ := pipeline(t, nb)
	ctx := context.Background()
	for _, name := range []string{"c1", "c2"} {
		if r := vmctl(t, ctx, env.URL, "create", name, "--backend", "noop", "--vcpus", "2", "--memory", "256", "--start"); r.code != 0 {
			t.Fatalf("create %s: %v", name, r)
		}
	}
	if r := vmctl(t, ctx, env.URL, "stop", "c2", "--stop-timeout", "5s"); r.code != 0 {
		t.Fatalf("stop c2: %v", r)
	}
	if !nb.Crash("c1", "killed by signal 9") {
		t.Fatal("crash failed")
	}
	env.WaitFor("c1 recorded as exited", 20*time.Second, func() bool {
		r := vmctl(t, ctx, env.URL, "list")
		return strings.Contains(r.out, "stopped (exited)")
	})
	r := vmctl(t, ctx, env.URL, "list")
	lines := strings.Split(strings.TrimSpace(r.out), "\n")
	if len(lines) != 3 || !strings.Contains(lines[0], "VCPUS") || !strings.Contains(lines[0], "MEMORY") || !strings.Contains(lines[0], "IP") {
		t.Fatalf("list:\n%s", r.out)
	}
	if f := strings.Fields(lines[1]); f[0] != "c1" || f[1] != "stopped" || f[2] != "(exited)" || f[5] != "2" || f[6] != "256M" {
		t.Fatalf("list row c1: %q", lines[1])
	}
	if f := strings.Fields(lines[2]); f[0] != "c2" || f[1] != "stopped" || f[2] == "(exited)" {
		t.Fatalf("list row c2 (a clean stop): %q", lines[2])
	}

	r = vmctl(t, ctx, env.URL, "status", "c1")
	if r.code != 0 || !strings.Contains(r.out, "stopped (exited)") || !strings.Contains(r.out, "killed by signal 9") ||
		!strings.Contains(r.out, "process:     not running") || strings.Contains(r.out, "pid:") {
		t.Fatalf("status c1:\n%v", r)
	}
	r = vmctl(t, ctx, env.URL, "ip", "c1")
	if r.code != ExitFailed || !strings.Contains(r.err, "c1 is not running: its process exited") || !strings.Contains(r.err, "vmctl start c1") {
		t.Fatalf("ip c1: %v", r)
	}
	r = vmctl(t, ctx, env.URL, "ip", "c2")
	if r.code != ExitFailed || !strings.Contains(r.err, "c2 is not running (state stopped)") {
		t.Fatalf("ip c2: %v", r)
	}
	// Started again, the exit is history.
	if r := vmctl(t, ctx, env.URL, "start", "c1"); r.code != 0 {
		t.Fatalf("start c1: %v", r)
	}
	if r := vmctl(t, ctx, env.URL, "list"); strings.Contains(r.out, "exited") {
		t.Fatalf("list after restart:\n%s", r.out)
	}
	// --stop-timeout is a duration on destroy too, sent in seconds.
	if r := vmctl(t, ctx, env.URL, "destroy", "c1", "--stop-timeout", "45s"); r.code != 0 {
		t.Fatalf("destroy: %v", r)
	}
	var acc *api.Event
	for _, s := range env.Events("c1") {
		if s.Event.Type == api.TypeAccepted && s.Event.Action == "destroy" {
			acc = s.Event
		}
	}
	if acc == nil || acc.TimeoutS != 45 {
		t.Fatalf("destroy accepted with %+v", acc)
	}
	// Completion lists the VMs' names, not destroyed ones.
	r = vmctl(t, ctx, env.URL, "__complete", "start", "c")
	if r.code != 0 || strings.Contains(r.out, "c1\n") || !strings.Contains(r.out, "c2\n") {
		t.Fatalf("completion: %v", r)
	}
}

// A command's result, once vmctl has printed it, is in the VM's record:
// the next vmctl (ssh, provision, ip) reads the record, and the projector
// writes it a moment after the event is stored.
func TestResultIsInTheRecordOnReturn(t *testing.T) {
	t.Parallel()
	env, _ := pipeline(t, noop.New(noop.Options{}))
	ctx := context.Background()
	kv, err := env.JS.KeyValue(ctx, env.Names.RecordsBucket())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]api.VmState{"start": api.StateRunning, "stop": api.StateStopped}
	if r := vmctl(t, ctx, env.URL, "create", "r1", "--backend", "noop"); r.code != 0 {
		t.Fatalf("create: %v", r)
	}
	for i := range 20 {
		action := []string{"start", "stop"}[i%2]
		if r := vmctl(t, ctx, env.URL, action, "r1"); r.code != 0 {
			t.Fatalf("%s: %v", action, r)
		}
		e, err := kv.Get(ctx, "r1")
		if err != nil {
			t.Fatal(err)
		}
		rec, err := api.UnmarshalRecord(e.Value())
		if err != nil {
			t.Fatal(err)
		}
		if rec.State != want[action] || len(rec.InFlight) != 0 {
			t.Fatalf("right after %s #%d returned, the record says %s with %d in flight; want %s", action, i, rec.State, len(rec.InFlight), want[action])
		}
	}
}

// Every vmctl leaves the server's consumers as it found them: lifecycle
// commands (with and without --no-wait), their waits, status, history,
// events of one VM, list, hosts, image list and completion read without
// consumers, and a whole-stream `events` deletes the one it makes. Each
// command is checked on its own, so a leak names the command.
func TestLeavesNoConsumers(t *testing.T) {
	t.Parallel()
	env, _ := pipeline(t, nil)
	ctx := context.Background()
	// The engine makes the host's task consumer from its heartbeat.
	env.WaitFor("worker-h1's task consumer", 10*time.Second, func() bool { return env.ConsumerCounts()[env.Names.TasksStream()] == 1 })
	before := env.ConsumerCounts()
	for _, args := range [][]string{
		{"create", "n1", "--backend", "noop", "--no-wait"},
		{"create", "n2", "--backend", "noop", "--start"},
		{"stop", "n2"},
		{"start", "n2", "--no-wait"},
		{"status", "n2"},
		{"history", "n2"},
		{"--json", "history", "n2"},
		{"events", "n2", "--last", "2"},
		{"events", "--last", "3"},
		{"--json", "events"},
		{"list"},
		{"hosts"},
		{"image", "list"},
		{"__complete", "start", "n"},
		{"destroy", "n1"},
		{"destroy", "n2", "--no-wait"},
	} {
		if r := vmctl(t, ctx, env.URL, args...); r.code != 0 {
			t.Fatalf("vmctl %v: %v", args, r)
		}
		if after := env.ConsumerCounts(); !reflect.DeepEqual(after, before) {
			t.Fatalf("vmctl %v left consumers: before %v, after %v", args, before, after)
		}
	}
	// A follower reads without a consumer while it runs, too.
	fctx, cancel := context.WithCancel(ctx)
	var out, errOut syncbuf.Buffer
	done := make(chan int, 1)
	go func() { done <- Run(fctx, []string{"--server", env.URL, "events", "n3", "--follow"}, &out, &errOut) }()
	if r := vmctl(t, ctx, env.URL, "create", "n3", "--backend", "noop"); r.code != 0 {
		t.Fatalf("create n3: %v", r)
	}
	env.WaitFor("events n3 --follow to print the result", 10*time.Second, func() bool { return strings.Contains(out.String(), "prepared") })
	if after := env.ConsumerCounts(); !reflect.DeepEqual(after, before) {
		t.Fatalf("events --follow holds consumers: before %v, while it runs %v", before, after)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("events n3 --follow: exit %d\n%s%s", code, out.String(), errOut.String())
	}
}

package chaos_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/fleet"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/relay"
	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
)

// replicas reads num_replicas of each stream and bucket with the nats CLI.
func replicas(t *testing.T, ctx context.Context, f *fleet.Fleet, natsCLI string) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, s := range []string{"VM_COMMANDS", "VM_EVENTS", "VM_TASKS", "KV_VM_RECORDS", "KV_VM_HOSTS", "KV_VM_IMAGES"} {
		o, code := f.Exec(ctx, "", natsCLI, "--server", f.URLs, "--creds", f.AdminCreds(), "--tlsca", f.TLS.CA, "stream", "info", s, "--json")
		if code != 0 {
			t.Fatalf("nats stream info %s: %s", s, o)
		}
		var info struct {
			Config struct {
				Replicas int `json:"num_replicas"`
			} `json:"config"`
		}
		if err := json.Unmarshal([]byte(o), &info); err != nil {
			t.Fatalf("stream info %s: %v\n%s", s, err, o)
		}
		out[s] = info.Config.Replicas
	}
	return out
}

// The fleet from nothing: a fresh 3-node cluster, two engines and a worker
// per host netns start with no manual step; the streams and buckets are R3
// and stay R3 whatever workers start; a QEMU VM on host h2 is created,
// booted, stopped and destroyed by commands sent from host h1's namespace,
// and its guest answers on its own host's forwarded port (and not from the
// root namespace, which is another network).
func TestFleetFromScratchWithQEMU(t *testing.T) {
	_, err := os.Stat("/usr/bin/qemu-system-x86_64")
	testenv.Require(t, err == nil, "qemu-system-x86_64 is not installed")
	image := guestimage.EnsureForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	start := time.Now()
	testenv.Tool(t, "nats")
	f := upFleet(t, ctx, fleet.Config{Hosts: []fleet.HostConfig{
		{Name: "h1", Backends: "noop"},
		{Name: "h2", Backends: "noop,qemu", WorkerArgs: []string{"--metrics-listen", "0.0.0.0:9101", "--image-dir", filepath.Dir(image)}},
	}})
	t.Logf("fleet up in %s", time.Since(start).Round(time.Millisecond))
	natsCLI := filepath.Join(filepath.Dir(testenv.Tool(t, "nats-server")), "nats")

	for s, r := range replicas(t, ctx, f, natsCLI) {
		if r != 3 {
			t.Errorf("%s has %d replicas, want 3", s, r)
		}
	}
	// A worker restarted (and one more host's worker) never touch them.
	f.Workers["h1"].Kill()
	if err := f.StartWorker("h1"); err != nil {
		t.Fatal(err)
	}
	h1 := f.Hosts["h1"].NetNS
	h2 := f.Hosts["h2"].NetNS
	vmctl := func(netns string, args ...string) string {
		t.Helper()
		out, code := f.Vmctl(ctx, netns, args...)
		if code != 0 {
			t.Fatalf("vmctl %v (netns %s): exit %d\n%s", args, netns, code, out)
		}
		return out
	}
	// Noop from h1's namespace, placed anywhere.
	vmctl(h1, "create", "n1", "--backend", "noop", "--start")
	for s, r := range replicas(t, ctx, f, natsCLI) {
		if r != 3 {
			t.Errorf("after a worker restart, %s has %d replicas, want 3", s, r)
		}
	}

	// QEMU on h2, driven from h1; its console log followed from h1 while
	// it boots (vmctl log -f, through h2's worker).
	vmctl(h1, "create", "q1", "--backend", "qemu", "--image", image, "--memory", "256", "--host", "h2", "--start")
	var logf syncbuf.Buffer
	follow := f.VmctlCmd(ctx, h1, "log", "-f", "q1")
	follow.Stdout, follow.Stderr = &logf, &logf
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = follow.Process.Kill(); _ = follow.Wait() }()
	var port string
	deadline := time.Now().Add(3 * time.Minute)
	for {
		out, code := f.Vmctl(ctx, h1, "ip", "q1")
		if m := regexp.MustCompile(`port (\d+)`).FindStringSubmatch(out); code == 0 && m != nil {
			port = m[1]
		}
		if port != "" && strings.Contains(logf.String(), "VMHERD-GUEST-READY") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest q1 never booted, or log -f never showed it: ip: %s\nlog -f:\n%s", out, logf.String())
		}
		time.Sleep(time.Second)
	}
	if !strings.Contains(logf.String(), "vmherd-guest: booting") {
		t.Errorf("log -f from h1 missed the start of the boot:\n%.2000s", logf.String())
	}
	banner := func(netns string) (string, int) {
		return f.Exec(ctx, netns, "timeout", "5", "bash", "-c",
			fmt.Sprintf("exec 3<>/dev/tcp/127.0.0.1/%s && head -n 1 <&3", port))
	}
	var b string
	for deadline := time.Now().Add(2 * time.Minute); ; {
		var code int
		if b, code = banner(h2); code == 0 && strings.HasPrefix(b, "SSH-") {
			break
		}
		if time.Now().After(deadline) {
			log, _ := f.Vmctl(ctx, h1, "log", "q1", "--tail", "30")
			t.Fatalf("no SSH banner from the guest on host h2's 127.0.0.1:%s: exit %d %q\nconsole:\n%s", port, code, b, log)
		}
		time.Sleep(time.Second)
	}
	t.Logf("guest q1 on h2 answers %q", strings.TrimSpace(b))
	if out, code := banner(""); code == 0 && strings.HasPrefix(out, "SSH-") {
		t.Fatalf("the guest's forwarded port answers in the root namespace too: the VM is not in h2's network")
	}
	relayFromAnywhere(t, ctx, f, h1)
	vmctl(h1, "stop", "q1", "--stop-timeout", "60s")
	if out := vmctl(h1, "status", "q1"); !strings.Contains(out, "stopped") {
		t.Fatalf("status after stop:\n%s", out)
	}
	// h2's worker metrics, scraped from the root namespace.
	metrics, code := f.Exec(ctx, "", "timeout", "5", "bash", "-c",
		fmt.Sprintf("exec 3<>/dev/tcp/%s/9101 && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3", f.Hosts["h2"].Addr))
	if code != 0 || !strings.Contains(metrics, `vmherd_backend_call_seconds_count{action="stop",backend="qemu"} 1`) ||
		!strings.Contains(metrics, `vmherd_task_seconds_count{action="start",result="started"} 1`) {
		t.Fatalf("h2's worker metrics (exit %d):\n%s", code, metrics)
	}

	// Fencing with a real QEMU: q1 runs on h2, h2 drops off the network
	// for good (as far as the fleet can tell), q1 is forgotten; when h2
	// comes back its worker kills q1's QEMU and reports fenced.
	vmctl(h1, "start", "q1")
	var rec struct {
		Record struct {
			Handle struct{ PID int } `json:"handle"`
		} `json:"record"`
	}
	if err := json.Unmarshal([]byte(vmctl(h1, "status", "q1", "--json")), &rec); err != nil || rec.Record.Handle.PID == 0 {
		t.Fatalf("q1's pid: %v %+v", err, rec)
	}
	pid := rec.Record.Handle.PID
	if err := f.CutHost("h2", true); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); ; {
		out, _ := f.Vmctl(ctx, h1, "hosts", "--json")
		if strings.Contains(out, `"status": "lost"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("h2 never lost:\n%s", out)
		}
		time.Sleep(time.Second)
	}
	vmctl(h1, "destroy", "--forget", "q1")
	if !processAlive(pid) {
		t.Fatalf("q1's QEMU (pid %d) is gone before h2 is back", pid)
	}
	if err := f.CutHost("h2", false); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Minute); ; {
		out := vmctl(h1, "history", "q1")
		if strings.Contains(out, "fenced") && !processAlive(pid) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("q1 not fenced after h2 came back (QEMU pid %d alive: %v):\n%s", pid, processAlive(pid), out)
		}
		time.Sleep(time.Second)
	}
	t.Logf("q1's QEMU (pid %d) fenced by h2's worker on its return", pid)
	vmctl(h1, "destroy", "n1")
	if out := vmctl("", "list", "--all"); !strings.Contains(out, "q1") || strings.Count(out, "destroyed") != 2 {
		t.Fatalf("list --all:\n%s", out)
	}
}

// processAlive reports whether pid runs (a zombie, which a daemonized
// QEMU becomes until init reaps it, does not).
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// relayFromAnywhere drives q1 (a QEMU guest on h2) from h1's network
// namespace and from the test process, never from h2: two consoles at
// once, one stalled for 10 s; a port-forward and ssh to the guest's SSH
// port.
func relayFromAnywhere(t *testing.T, ctx context.Context, f *fleet.Fleet, h1 string) {
	t.Helper()
	con := f.VmctlCmd(ctx, h1, "console", "q1")
	stdin, err := con.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var conOut syncbuf.Buffer
	con.Stdout, con.Stderr = &conOut, &conOut
	if err := con.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = con.Process.Kill() }()
	waitOut := func(what string, buf *syncbuf.Buffer, want string, timeout time.Duration) {
		t.Helper()
		for deadline := time.Now().Add(timeout); !strings.Contains(buf.String(), want); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: no %q within %s; got:\n%s", what, want, timeout, tailOf(buf.String(), 3000))
			}
		}
	}
	// The first viewer is shown the guest's boot output.
	waitOut("vmctl console from h1", &conOut, "VMHERD-GUEST-READY", 30*time.Second)
	nc, err := nats.Connect(f.URLs, f.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	names := api.DefaultNames
	second, err := relay.AttachConsole(ctx, nc, names, "h2", "q1")
	if err != nil {
		t.Fatal(err)
	}
	var secondOut syncbuf.Buffer
	reading := make(chan struct{})
	go func() {
		defer close(reading)
		_, _ = io.Copy(&secondOut, second)
	}()
	// Typed in h1's namespace: the guest's shell runs it, both viewers see it.
	if _, err := stdin.Write([]byte("\necho relay-$((6*7))\n")); err != nil {
		t.Fatal(err)
	}
	waitOut("console from h1", &conOut, "relay-42", 30*time.Second)
	waitOut("second viewer", &secondOut, "relay-42", 10*time.Second)
	if _, err := second.Write([]byte("echo from-second-$((2*3))\n")); err != nil {
		t.Fatal(err)
	}
	waitOut("console from h1", &conOut, "from-second-6", 30*time.Second)

	// A third viewer stops reading for 10 s while the guest prints: the
	// guest goes on (the other viewer and the log see it all), and the
	// stalled viewer's client holds a bounded buffer.
	stalled, err := relay.AttachConsole(ctx, nc, names, "h2", "q1")
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	if _, err := stdin.Write([]byte("i=0; while [ $i -lt 4000 ]; do echo tick-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done; echo LOOP-$((40*25))-DONE\n")); err != nil {
		t.Fatal(err)
	}
	ticks := func() int { return strings.Count(secondOut.String(), "xxxxxxxxxxxxxxxxxxxx\r\n") }
	before := ticks()
	time.Sleep(10 * time.Second)
	during := ticks() - before
	t.Logf("while a viewer did not read for 10s: the other saw %d lines; the stalled one holds %d messages (bound %d), its client dropped %d",
		during, stalled.Buffered(), relay.ViewerBuffer, stalled.Dropped())
	if during < 200 {
		t.Errorf("only %d lines reached the reading viewer while another stalled: the guest was held up", during)
	}
	if stalled.Buffered() > relay.ViewerBuffer {
		t.Errorf("the stalled viewer holds %d messages, over its bound %d", stalled.Buffered(), relay.ViewerBuffer)
	}
	waitOut("second viewer", &secondOut, "LOOP-1000-DONE", 3*time.Minute)
	if log, _ := f.Vmctl(ctx, h1, "log", "q1", "--tail", "5"); !strings.Contains(log, "LOOP-1000-DONE") {
		t.Errorf("the console log lacks the loop's end:\n%s", log)
	}
	// Reading again, it gets what it held, is told what it lost, and
	// follows the console from there.
	var stalledOut syncbuf.Buffer
	go func() { _, _ = io.Copy(&stalledOut, stalled) }()
	if _, err := second.Write([]byte("echo caught-$((3*3))-up\n")); err != nil {
		t.Fatal(err)
	}
	waitOut("the stalled viewer, reading again", &stalledOut, "caught-9-up", 30*time.Second)
	if stalled.Dropped() > 0 && !strings.Contains(stalledOut.String(), "bytes of console output lost") {
		t.Errorf("the stalled viewer's client dropped %d messages but it was not told", stalled.Dropped())
	}
	t.Logf("the stalled viewer lost %d bytes, was told so, and caught up", stalled.Lost)

	// Ctrl-] detaches vmctl console.
	if _, err := stdin.Write([]byte{0x1d}); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- con.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("vmctl console after Ctrl-]: %v\n%s", err, tailOf(conOut.String(), 2000))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("vmctl console did not exit on Ctrl-]")
	}
	_ = second.Close()
	<-reading

	// The guest's SSH port from h1's namespace: vmctl port-forward, and
	// the system ssh through vmctl proxy (ssh -v reports the server's
	// version; the login itself needs a key, which provisioning tests).
	pf := f.VmctlCmd(ctx, h1, "port-forward", "q1", "2222:22")
	var pfOut syncbuf.Buffer
	pf.Stdout, pf.Stderr = &pfOut, &pfOut
	if err := pf.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pf.Process.Kill(); _ = pf.Wait() }()
	waitOut("port-forward", &pfOut, "forwarding", 30*time.Second)
	out, code := f.Exec(ctx, h1, "timeout", "20", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/2222 && head -n 1 <&3")
	if code != 0 || !strings.HasPrefix(out, guestimage.SSHBanner) {
		t.Fatalf("port-forward from h1: exit %d %q\n%s", code, out, pfOut.String())
	}
	t.Logf("port-forward in h1's namespace reaches q1's SSH port: %q", strings.TrimSpace(out))
	sshArgs := []string{"ssh", "q1", "--", "-v", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "UserKnownHostsFile=/dev/null", "true"}
	out, _ = f.Vmctl(ctx, h1, sshArgs...)
	if !strings.Contains(out, "remote software version dropbear") {
		t.Fatalf("vmctl ssh from h1 did not reach the guest's SSH server:\n%s", out)
	}
}

// tailOf is the end of s.
func tailOf(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

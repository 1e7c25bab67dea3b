package chaos_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/fleet"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/testenv"
)

// replicas reads num_replicas of each stream and bucket with the nats CLI.
func replicas(t *testing.T, ctx context.Context, f *fleet.Fleet, natsCLI string) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, s := range []string{"VM_COMMANDS", "VM_EVENTS", "VM_TASKS", "KV_VM_RECORDS", "KV_VM_HOSTS"} {
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

	// QEMU on h2, driven from h1.
	vmctl(h1, "create", "q1", "--backend", "qemu", "--image", image, "--memory", "256", "--host", "h2", "--start")
	var port string
	deadline := time.Now().Add(3 * time.Minute)
	for {
		out, code := f.Vmctl(ctx, h1, "ip", "q1")
		if m := regexp.MustCompile(`port (\d+)`).FindStringSubmatch(out); code == 0 && m != nil {
			port = m[1]
		}
		log, _ := f.Vmctl(ctx, h2, "log", "q1")
		if port != "" && strings.Contains(log, "VMHERD-GUEST-READY") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest q1 never booted: ip: %s\nlog:\n%s", out, log)
		}
		time.Sleep(time.Second)
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
			log, _ := f.Vmctl(ctx, h2, "log", "q1", "--tail", "30")
			t.Fatalf("no SSH banner from the guest on host h2's 127.0.0.1:%s: exit %d %q\nconsole:\n%s", port, code, b, log)
		}
		time.Sleep(time.Second)
	}
	t.Logf("guest q1 on h2 answers %q", strings.TrimSpace(b))
	if out, code := banner(""); code == 0 && strings.HasPrefix(out, "SSH-") {
		t.Fatalf("the guest's forwarded port answers in the root namespace too: the VM is not in h2's network")
	}
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

package app_test

import (
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/testenv"
)

// engineWithSlowCall starts bin/engine with a local Noop worker whose calls
// take 20 s, and leaves one prepare in progress on the worker.
func engineWithSlowCall(t *testing.T, extra ...string) *testenv.Proc {
	t.Helper()
	bin := testenv.Binaries(t)
	port := testenv.FreePort(t)
	dir := t.TempDir()
	args := append([]string{"--data-dir", dir, "--listen", testenv.Addr(port),
		"--with-worker", "--backends", "noop", "--host", "box1", "--noop-latency", "20s"}, extra...)
	p := testenv.StartProc(t, "engine", filepath.Join(bin, "engine"), nil, args...)
	p.WaitLog("engine serving", 60*time.Second)
	url := fmt.Sprintf("nats://%s", testenv.Addr(port))
	vmctl := func(args ...string) string {
		out, errOut, _ := testenv.Run(t, 30*time.Second, []string{"VMHERD_DATA_DIR=" + dir}, filepath.Join(bin, "vmctl"), append([]string{"--server", url}, args...)...)
		return out + errOut
	}
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(vmctl("--no-wait", "create", "slow1", "--backend", "noop"), "stored as command") {
		if time.Now().After(deadline) {
			t.Fatalf("could not send prepare:\n%s", p.Output())
		}
		time.Sleep(100 * time.Millisecond)
	}
	for !strings.Contains(vmctl("history", "slow1"), "accepted") {
		if time.Now().After(deadline) {
			t.Fatalf("prepare never accepted:\n%s", p.Output())
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // the task reaches the worker's call
	return p
}

func waitExit(t *testing.T, p *testenv.Proc, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for !p.Exited() {
		if time.Since(start) > within {
			t.Fatalf("engine still running %s later:\n%s", within, p.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

// The first SIGTERM drains (a call in progress keeps the process up); a
// second one exits at once.
func TestSecondSignalForcesExit(t *testing.T) {
	p := engineWithSlowCall(t)
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	p.WaitLog("stopping: draining calls in progress", 10*time.Second)
	time.Sleep(time.Second)
	if p.Exited() {
		t.Fatalf("engine exited without draining the call in progress:\n%s", p.Output())
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	took := waitExit(t, p, 3*time.Second)
	t.Logf("exited %s after the second signal", took)
	if code := p.Cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(p.Output(), "second signal") {
		t.Fatalf("exit code %d after the second signal:\n%s", code, p.Output())
	}
}

// --drain-timeout bounds the drain.
func TestDrainDeadline(t *testing.T) {
	p := engineWithSlowCall(t, "--drain-timeout", "2s")
	start := time.Now()
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	waitExit(t, p, 10*time.Second)
	took := time.Since(start)
	if took < 2*time.Second || took > 6*time.Second {
		t.Fatalf("exited %s after SIGTERM with --drain-timeout 2s", took)
	}
	if code := p.Cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(p.Output(), "drain deadline passed") {
		t.Fatalf("exit code %d:\n%s", code, p.Output())
	}
}

package e2e_test

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/testenv"
)

// Ctrl-C (a real SIGINT to the vmctl process) after the command was
// stored: vmctl exits 130 saying the command will still be applied, with
// its id and how to watch it, and the command is applied.
func TestVmctlSIGINTAfterStore(t *testing.T) {
	bin := testenv.Binaries(t)
	port := testenv.FreePort(t)
	url := fmt.Sprintf("nats://%s", testenv.Addr(port))
	dir := t.TempDir()
	eng := testenv.StartProc(t, "engine", filepath.Join(bin, "engine"), nil,
		"--data-dir", dir, "--listen", testenv.Addr(port), "--with-worker",
		"--backends", "noop", "--host", "box1", "--noop-latency", "3s")
	eng.WaitLog("engine serving", 60*time.Second)
	vmctl := func(args ...string) (string, string, int) {
		return testenv.Run(t, 60*time.Second, []string{"NATS_URL=" + url, "VMHERD_DATA_DIR=" + dir}, filepath.Join(bin, "vmctl"), args...)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, errOut, code := vmctl("create", "sig1", "--backend", "noop")
		if code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("create: exit %d\n%s%s", code, out, errOut)
		}
		time.Sleep(200 * time.Millisecond) // the local worker's first heartbeat
	}
	p := testenv.StartProc(t, "vmctl", filepath.Join(bin, "vmctl"), []string{"NATS_URL=" + url, "VMHERD_DATA_DIR=" + dir}, "start", "sig1")
	p.WaitLog("accepted on host box1", 20*time.Second)
	if err := p.Cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	for start := time.Now(); !p.Exited(); {
		if time.Since(start) > 5*time.Second {
			t.Fatalf("vmctl still running 5s after SIGINT:\n%s", p.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
	out := p.Output()
	id := regexp.MustCompile(`command (vmctl-[0-9a-f]+)`).FindStringSubmatch(out)
	if code := p.Cmd.ProcessState.ExitCode(); code != 130 || id == nil ||
		!strings.Contains(out, "interrupted: start sig1 was accepted") || !strings.Contains(out, "vmctl events sig1 --follow") {
		t.Fatalf("vmctl after SIGINT: exit %d\n%s", p.Cmd.ProcessState.ExitCode(), out)
	}
	// The interrupted command is still carried out.
	for deadline := time.Now().Add(30 * time.Second); ; {
		hist, _, _ := vmctl("history", "sig1")
		if strings.Contains(hist, "started") && strings.Contains(hist, id[1]) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the interrupted start never finished:\n%s", hist)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

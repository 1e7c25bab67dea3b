package e2e_test

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/testenv"
)

// TestCIRunnerExample runs examples/ci-runner, a program that uses only
// vmherd's public packages (api and client), as an operator against the
// single-host engine process (embedded NATS, a local QEMU worker, the
// test guest under TCG): it must create the VM with its own SSH key, print
// the VM's events as they are stored, reach the guest's SSH server through
// the tunnel, run the command there, destroy the VM and exit with the
// command's status. It runs twice with the same VM name, as CI jobs reuse
// names; each run prints its own VM's events and no earlier ones, and
// leaves no QEMU process behind.
func TestCIRunnerExample(t *testing.T) {
	_, err := os.Stat("/usr/bin/qemu-system-x86_64")
	testenv.Require(t, err == nil, "qemu-system-x86_64 is not installed")
	image := guestimage.EnsureForTest(t)
	root := testenv.RepoRoot(t)

	// Only the public packages: the example is documentation of them.
	out, err := exec.Command("go", "list", "-C", root, "-f", `{{join .Imports "\n"}}`, "./examples/ci-runner").Output()
	if err != nil {
		t.Fatalf("go list ./examples/ci-runner: %v", err)
	}
	for _, imp := range strings.Fields(string(out)) {
		if strings.HasPrefix(imp, "github.com/vmherd/vmherd/") && imp != "github.com/vmherd/vmherd/api" && imp != "github.com/vmherd/vmherd/client" {
			t.Errorf("examples/ci-runner imports %s; it may use only vmherd's api and client packages", imp)
		}
	}
	runner := filepath.Join(t.TempDir(), "ci-runner")
	if out, err := exec.Command("go", "build", "-C", root, "-race", "-o", runner, "./examples/ci-runner").CombinedOutput(); err != nil {
		t.Fatalf("go build ./examples/ci-runner: %v\n%s", err, out)
	}

	url, data, env := authEngine(t, "--backends", "noop,qemu", "--image-dir", filepath.Dir(image))
	creds := filepath.Join(t.TempDir(), "ci.creds")
	engine := filepath.Join(testenv.Binaries(t), "engine")
	if out, errOut, code := testenv.Run(t, 30*time.Second, nil, engine, "creds", "--data-dir", data, "--role", "operator", "--name", "ci", "-o", creds); code != 0 {
		t.Fatalf("engine creds: exit %d\n%s%s", code, out, errOut)
	}

	runEnv := []string{"NATS_URL=" + url, "NATS_CREDS=" + creds}
	const name = "cijob"
	var after uint64                   // the last event of the previous run
	for i, exit := range []int{0, 3} { // the second job's command fails: its status is the runner's
		run, t0 := i+1, time.Now()
		stdout, stderr, code := testenv.Run(t, 6*time.Minute, runEnv,
			runner, "-name", name, "-image", image, "-memory", "192", "-timeout", "5m",
			"--", "echo hello-from-guest; uname -s; id -un; echo to-stderr >&2; exit "+strconv.Itoa(exit))
		sshLine := "no ssh"
		if i := strings.Index(stdout, "ssh answered"); i >= 0 {
			sshLine, _, _ = strings.Cut(stdout[i:], "\n")
		}
		t.Logf("run %d: exit %d in %s (%s)", run, code, time.Since(t0).Round(100*time.Millisecond), sshLine)
		if code != exit {
			t.Fatalf("run %d: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", run, code, exit, stdout, stderr)
		}
		if !strings.Contains(stdout, "hello-from-guest\nLinux\nci\n") || !strings.Contains(stderr, "to-stderr\n") || !strings.Contains(stdout, "exit status "+strconv.Itoa(exit)+"\n") {
			t.Fatalf("run %d: the command's output or status is missing\nstdout:\n%s\nstderr:\n%s", run, stdout, stderr)
		}
		if !strings.Contains(stdout, "guest host key SHA256:") || !strings.Contains(stdout, "ssh answered after ") {
			t.Errorf("run %d: no host key fingerprint or ssh wait line\n%s", run, stdout)
		}

		// The events it printed are exactly this VM's events of this run,
		// as the stream keeps them, in order.
		var printed []string
		sc := bufio.NewScanner(strings.NewReader(stdout))
		for sc.Scan() {
			if f := strings.Fields(sc.Text()); len(f) >= 4 && f[0] == "event" {
				printed = append(printed, f[1]+" "+f[2]+" "+f[3])
			}
		}
		var stored []string
		var started *api.VmHandle
		for _, s := range env.Events(name) {
			if s.Seq <= after || s.Event == nil {
				continue
			}
			stored = append(stored, strconv.FormatUint(s.Seq, 10)+" "+string(s.Event.Type)+" "+string(s.Event.Action))
			if s.Event.Type == api.TypeStarted && s.Event.Handle != nil {
				started = s.Event.Handle
			}
			after = s.Seq
		}
		if strings.Join(printed, "\n") != strings.Join(stored, "\n") {
			t.Errorf("run %d printed these events:\n%s\nthe stream has these:\n%s", run, strings.Join(printed, "\n"), strings.Join(stored, "\n"))
		}
		for _, w := range []string{"prepared prepare", "started start", "destroyed destroy"} {
			if !strings.Contains(strings.Join(printed, "\n"), w) {
				t.Errorf("run %d did not print a %q event:\n%s", run, w, stdout)
			}
		}

		rec := record(t, env, name)
		if rec == nil || rec.State != api.StateDestroyed {
			t.Fatalf("run %d: record after the job: %+v, want destroyed", run, rec)
		}
		if started == nil || started.PID == 0 || !strings.HasPrefix(started.WorkDir, data) {
			t.Fatalf("run %d: no started event with QEMU's pid and a work dir in %s: %+v", run, data, started)
		}
		if left := qemuProcesses(started.WorkDir); len(left) > 0 || qemuAlive(started.PID) {
			t.Fatalf("run %d: QEMU still running after destroy (pid %d): %v", run, started.PID, left)
		}
		if _, err := os.Stat(started.WorkDir); !os.IsNotExist(err) {
			t.Errorf("run %d: work dir %s still there after destroy: %v", run, started.WorkDir, err)
		}
	}

	// A name another job's VM holds: the prepare is rejected, the runner
	// exits 1 saying so, and it leaves that VM alone (no destroy).
	do(t, env, "cibusy", "prepare", "busy-p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}}, api.TypePrepared)
	stdout, stderr, code := testenv.Run(t, time.Minute, runEnv, runner, "-name", "cibusy", "-image", image, "--", "true")
	if code != 1 || !strings.Contains(stderr, "prepare of cibusy rejected by the engine") {
		t.Fatalf("a job on a name in use: exit %d, want 1 with the rejection\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	if rec := record(t, env, "cibusy"); rec == nil || rec.State != api.StatePrepared || env.CountType("cibusy", api.TypeDestroyed) != 0 {
		t.Fatalf("the other job's vm after the rejected job: %+v", rec)
	}
	for _, s := range env.Events("cibusy") {
		if s.Event != nil && s.Event.Action == api.ActDestroy {
			t.Fatalf("the runner sent a destroy for a vm it did not make: event %d %s", s.Seq, s.Event.Type)
		}
	}
}

// qemuProcesses lists the QEMU processes whose command line names dir.
func qemuProcesses(dir string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cmd := strings.ReplaceAll(string(b), "\x00", " ")
		if strings.Contains(cmd, "qemu-system") && strings.Contains(cmd, dir) {
			out = append(out, e.Name()+": "+cmd)
		}
	}
	return out
}

// qemuAlive reports whether pid is a running QEMU (a zombie is not).
func qemuAlive(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	cmd, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return err == nil && !strings.Contains(string(stat), ") Z ") && strings.Contains(string(cmd), "qemu-system")
}

package e2e_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/testenv"
)

// ciJob runs examples/ci-job.sh with env and returns its stdout, stderr
// and exit status.
func ciJob(t *testing.T, env []string, args ...string) (stdout, stderr string, code int, took time.Duration) {
	t.Helper()
	script := filepath.Join(testenv.RepoRoot(t), "examples", "ci-job.sh")
	cmd := exec.Command(testenv.Tool(t, "bash"), append([]string{script}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	took = time.Since(start)
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("running %s: %v", script, err)
	}
	return out.String(), errb.String(), code, took
}

// TestCIJobScript is issue #24: examples/ci-job.sh, a CI job written in
// bash with vmctl alone (create --start, wait --for ssh, ssh a command,
// log, destroy), run twice under the same VM name as CI systems reuse
// names, against the engine binary with its local QEMU worker and the
// test guest. Both runs exit 0 with the command's output, and only it, on
// stdout; each leaves the VM destroyed and no QEMU behind. The guest makes
// a new host key at every boot, so the second run logs in only because
// vmctl ssh pins host keys per incarnation of a VM, not per name: the
// known-hosts file ends with two entries holding two different keys.
func TestCIJobScript(t *testing.T) {
	_, err := os.Stat("/usr/bin/qemu-system-x86_64")
	testenv.Require(t, err == nil, "qemu-system-x86_64 is not installed")
	testenv.Tool(t, "ssh")
	testenv.Tool(t, "python3") // the script's strict JSON parser
	keygen := testenv.Tool(t, "ssh-keygen")
	image := guestimage.EnsureForTest(t)
	bin := testenv.Binaries(t)

	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	url := "nats://" + testenv.Addr(testenv.FreePort(t))
	eng := testenv.StartProc(t, "engine", filepath.Join(bin, "engine"), nil,
		"--data-dir", data, "--listen", strings.TrimPrefix(url, "nats://"), "--with-worker",
		"--backends", "qemu", "--host", "h1", "--image-dir", filepath.Dir(image))
	eng.WaitLog("engine serving", 60*time.Second)
	eng.WaitLog("task consumer ready", 60*time.Second) // the local worker heartbeats

	const name = "cijob1"
	env := []string{
		"NATS_URL=" + url,
		"VMHERD_DATA_DIR=" + data, // vmctl finds the engine's admin.creds there
		"XDG_STATE_HOME=" + filepath.Join(dir, "state"),
		"PATH=" + bin + ":" + os.Getenv("PATH"),
		"VMCTL_CREATE_FLAGS=--backend qemu --memory 256",
		"BOOT_TIMEOUT=" + bootWait.String(),
		"TMPDIR=" + dir,
	}
	vmctl := func(args ...string) (string, string, int) {
		return testenv.Run(t, time.Minute, env, filepath.Join(bin, "vmctl"), args...)
	}
	t.Cleanup(func() {
		// A run that failed half-way: no VM, no QEMU left behind.
		_, _, _ = vmctl("destroy", name, "--if-exists")
		for _, pid := range qemuUnder(data) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if err := eng.Term(60 * time.Second); err != nil {
			t.Logf("engine stop: %v", err)
		}
	})

	key := filepath.Join(dir, "id_ed25519")
	if out, err := exec.Command(keygen, "-q", "-t", "ed25519", "-N", "", "-C", "ci-job", "-f", key).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v\n%s", err, out)
	}

	for run := 1; run <= 2; run++ {
		stdout, stderr, code, took := ciJob(t, env, name, image, key+".pub", key,
			fmt.Sprintf(`echo "run %d on $(hostname) as $(id -un)"`, run))
		t.Logf("run %d: exit %d in %s", run, code, took.Round(time.Second))
		if code != 0 {
			t.Fatalf("run %d: exit %d, want 0\nstdout:\n%s\nstderr:\n%s\nengine log:\n%s", run, code, stdout, stderr, eng.Output())
		}
		// The guest's hostname is the VM's name; --ssh-key made user vm.
		if want := fmt.Sprintf("run %d on %s as vm\n", run, name); stdout != want {
			t.Fatalf("run %d: stdout %q, want the command's output %q and nothing else\nstderr:\n%s", run, stdout, want, stderr)
		}
		for _, w := range []string{"created and started " + name + " on host h1", "SSH answers (" + guestimage.SSHBanner,
			guestimage.ReadyMarker, "command exited 0", "destroy " + name + ": destroyed"} {
			if !strings.Contains(stderr, w) {
				t.Errorf("run %d: stderr lacks %q:\n%s", run, w, stderr)
			}
		}
		// The VM is destroyed (its record says so) and its QEMU is gone.
		out, errOut, code := vmctl("--json", "status", name)
		var st struct {
			Record *api.VmRecord `json:"record"`
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil || code != 0 || st.Record == nil || st.Record.State != api.StateDestroyed {
			t.Fatalf("run %d: vmctl --json status %s: exit %d, %v, want a destroyed record:\n%s%s", run, name, code, err, out, errOut)
		}
		if pids := qemuUnder(data); len(pids) > 0 {
			t.Fatalf("run %d: QEMU still running after the job: pids %v", run, pids)
		}
	}

	// Two incarnations, two host keys, both pinned (under an alias naming
	// the incarnation), none changed.
	b, err := os.ReadFile(filepath.Join(dir, "state", "vmherd", "known_hosts"))
	if err != nil {
		t.Fatalf("vmherd's known-hosts file: %v", err)
	}
	keys := map[string]bool{}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	for _, l := range lines {
		if f := strings.Fields(l); len(f) >= 3 {
			keys[f[1]+" "+f[2]] = true
		}
	}
	if len(lines) != 2 || len(keys) != 2 {
		t.Fatalf("vmherd's known-hosts file after two runs has %d entries with %d different keys, want 2 and 2 (a new host key per boot):\n%s", len(lines), len(keys), b)
	}
}

// qemuUnder lists the QEMU processes whose command line names a path
// under dir (this test's VMs, not another test's).
func qemuUnder(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if strings.HasPrefix(filepath.Base(args[0]), "qemu-system") && strings.Contains(string(b), dir+"/") {
			pids = append(pids, pid)
		}
	}
	return pids
}

// fakeVmctl is a vmctl that prints canned answers, for the script's own
// checks: each --json step's document comes from $FAKE_<STEP> (a file),
// ssh prints "remote output" and exits $FAKE_SSH_EXIT, log prints a line;
// every call is appended to $FAKE_CALLS.
const fakeVmctl = `#!/usr/bin/env bash
echo "$*" >>"$FAKE_CALLS"
case "$1 $2" in
  "--json destroy") cat "$FAKE_DESTROY" ;;
  "--json create") cat "$FAKE_CREATE"; exit "${FAKE_CREATE_EXIT:-0}" ;;
  "--json wait") cat "$FAKE_WAIT" ;;
  "ssh "*) echo "remote output"; exit "${FAKE_SSH_EXIT:-0}" ;;
  "log "*) echo "console line" ;;
  *) echo "fake vmctl: unexpected $*" >&2; exit 2 ;;
esac
`

// TestCIJobScriptChecks runs examples/ci-job.sh against a fake vmctl: the
// job's exit status is the command's, or that of the vmctl step that
// failed first; a step whose stdout is not exactly one JSON document (two
// documents, a text line, a duplicate key, NaN, nothing) or not the
// expected result fails the job with exit 1; and the VM is destroyed in
// every case once created.
func TestCIJobScriptChecks(t *testing.T) {
	testenv.Tool(t, "python3")
	const (
		destroyed = `{"vm":"j1","commands":[{"action":"destroy","command_id":"c-1","result":"destroyed","seq":9}],"record":{"name":"j1","state":"destroyed"}}`
		skipped   = `{"vm":"j1","commands":[{"action":"destroy","command_id":"","skipped":"no such VM; --if-exists"}]}`
		created   = `{"vm":"j1","commands":[{"action":"prepare","command_id":"c-2","result":"prepared","seq":3},{"action":"start","command_id":"c-3","result":"started","seq":5}],"record":{"name":"j1","state":"running","host":"h1"}}`
		waited    = `{"vm":"j1","for":"ssh","banner":"SSH-2.0-dropbear_2022.83","record":{"name":"j1","state":"running"}}`
		rejected  = `{"vm":"j1","commands":[{"action":"prepare","command_id":"c-2","result":"rejected","seq":3}],"error":{"kind":"rejected","exit_code":1,"message":"prepare j1 rejected: --image: no such file"}}`
	)
	for _, tc := range []struct {
		name                     string
		destroy, create, wait    string
		createExit, sshExit      int
		wantExit                 int
		wantStdout, wantInStderr string
		wantDestroys             int // destroy calls: the leftover check, then the clean-up
	}{
		{name: "ok", destroy: destroyed, create: created, wait: waited,
			wantExit: 0, wantStdout: "remote output\n", wantInStderr: "console line", wantDestroys: 2},
		{name: "command's exit status", destroy: destroyed, create: created, wait: waited, sshExit: 7,
			wantExit: 7, wantStdout: "remote output\n", wantInStderr: "command exited 7", wantDestroys: 2},
		{name: "two documents", destroy: destroyed, create: created + "\n" + created, wait: waited,
			wantExit: 1, wantInStderr: "not exactly one JSON document: Extra data", wantDestroys: 2},
		{name: "text line before the document", destroy: destroyed, create: created, wait: "j1: SSH answers\n" + waited,
			wantExit: 1, wantInStderr: "not exactly one JSON document", wantDestroys: 2},
		{name: "duplicate key", destroy: destroyed, create: created, wait: `{"vm":"j1","vm":"j2","for":"ssh"}`,
			wantExit: 1, wantInStderr: "duplicate key 'vm'", wantDestroys: 2},
		{name: "NaN", destroy: destroyed, create: `{"vm":"j1","commands":[{"result":NaN}]}`, wait: waited,
			wantExit: 1, wantInStderr: "NaN is not JSON", wantDestroys: 2},
		{name: "no document", destroy: "", create: created, wait: waited,
			wantExit: 1, wantInStderr: "not exactly one JSON document", wantDestroys: 1},
		{name: "rejected", destroy: skipped, create: rejected, createExit: 1, wait: waited,
			wantExit: 1, wantInStderr: "create j1: exit 1: prepare j1 rejected: --image: no such file", wantDestroys: 2},
		{name: "no result: vmctl's exit status", destroy: destroyed, create: `{"vm":"j1","commands":[],"error":{"kind":"no_engine","exit_code":3,"message":"no engine is deciding commands"}}`, createExit: 3, wait: waited,
			wantExit: 3, wantInStderr: "create j1: exit 3: no engine is deciding commands", wantDestroys: 2},
		{name: "exit 0 without started", destroy: destroyed, create: strings.Replace(created, `"started"`, `"rejected"`, 1), wait: waited,
			wantExit: 1, wantInStderr: "results prepared, rejected; want prepared, started", wantDestroys: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			write := func(name, content string, mode os.FileMode) string {
				p := filepath.Join(dir, name)
				if err := os.WriteFile(p, []byte(content), mode); err != nil {
					t.Fatal(err)
				}
				return p
			}
			env := []string{
				"VMCTL=" + write("vmctl", fakeVmctl, 0o755),
				"FAKE_CALLS=" + filepath.Join(dir, "calls"),
				"FAKE_DESTROY=" + write("destroy.json", tc.destroy, 0o644),
				"FAKE_CREATE=" + write("create.json", tc.create, 0o644),
				"FAKE_WAIT=" + write("wait.json", tc.wait, 0o644),
				"FAKE_CREATE_EXIT=" + strconv.Itoa(tc.createExit),
				"FAKE_SSH_EXIT=" + strconv.Itoa(tc.sshExit),
				"TMPDIR=" + dir,
			}
			stdout, stderr, code, _ := ciJob(t, env, "j1", "guest.qcow2", "k.pub", "k", "true")
			calls, _ := os.ReadFile(filepath.Join(dir, "calls"))
			if code != tc.wantExit || stdout != tc.wantStdout || !strings.Contains(stderr, tc.wantInStderr) ||
				strings.Count(string(calls), "--json destroy j1 --if-exists\n") != tc.wantDestroys {
				t.Fatalf("exit %d, stdout %q; want exit %d, stdout %q, %q in stderr and %d destroys\nstderr:\n%s\nvmctl calls:\n%s",
					code, stdout, tc.wantExit, tc.wantStdout, tc.wantInStderr, tc.wantDestroys, stderr, calls)
			}
			if left, _ := filepath.Glob(filepath.Join(dir, "ci-job.*")); len(left) > 0 {
				t.Errorf("the script left its work directory: %v", left)
			}
		})
	}
}

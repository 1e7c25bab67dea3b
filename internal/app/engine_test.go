package app_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/app"
	"github.com/vmherd/vmherd/internal/testenv"
)

// startEngine runs bin/engine on dir and port and waits until it serves.
func startEngine(t *testing.T, bin, dir string, port int) *testenv.Proc {
	t.Helper()
	p := testenv.StartProc(t, "engine", filepath.Join(bin, "engine"), nil,
		"--data-dir", dir, "--listen", testenv.Addr(port),
		"--with-worker", "--backends", "noop", "--host", "box1")
	p.WaitLog("engine serving", 60*time.Second)
	return p
}

// runEngine runs bin/engine to its end, which must come within 2s.
func runEngine(t *testing.T, bin string, args ...string) (stderr string, code int) {
	t.Helper()
	start := time.Now()
	out, errOut, code := testenv.Run(t, 30*time.Second, nil, filepath.Join(bin, "engine"), args...)
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("engine took %s to give up, want under 2s", took)
	}
	return out + errOut, code
}

func TestEngineRefusesLockedDataDir(t *testing.T) {
	bin := testenv.Binaries(t)
	dir := filepath.Join(t.TempDir(), "data")
	first := startEngine(t, bin, dir, testenv.FreePort(t))

	out, code := runEngine(t, bin, "--data-dir", dir, "--listen", testenv.Addr(testenv.FreePort(t)))
	if code == 0 {
		t.Fatalf("second engine on %s exited 0:\n%s", dir, out)
	}
	want := "engine: data dir " + dir + " is in use by another engine (pid " +
		strconv.Itoa(first.Cmd.Process.Pid) + " holds " + filepath.Join(dir, "engine.lock") +
		"); stop it or choose another --data-dir"
	if !strings.Contains(out, want) {
		t.Errorf("second engine's output lacks\n%s\ngot:\n%s", want, out)
	}
	if first.Exited() {
		t.Fatalf("first engine exited:\n%s", first.Output())
	}
}

func TestEngineRefusesTakenListenAddress(t *testing.T) {
	bin := testenv.Binaries(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	addr := l.Addr().String()
	dir := filepath.Join(t.TempDir(), "data")

	out, code := runEngine(t, bin, "--data-dir", dir, "--listen", addr)
	if code == 0 {
		t.Fatalf("engine on taken %s exited 0:\n%s", addr, out)
	}
	want := "engine: listening on " + addr + ": address already in use (another engine or nats-server is running there; stop it or choose --listen)"
	if !strings.Contains(out, want) {
		t.Errorf("engine's output lacks\n%s\ngot:\n%s", want, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "jetstream")); err == nil {
		t.Errorf("engine created its JetStream store though it could not listen")
	}
}

func TestEngineRestartsAfterSIGKILL(t *testing.T) {
	bin := testenv.Binaries(t)
	dir := filepath.Join(t.TempDir(), "data")
	port := testenv.FreePort(t)
	first := startEngine(t, bin, dir, port)
	first.Kill() // SIGKILL; waits until it is gone
	lockFile := filepath.Join(dir, "engine.lock")
	if b, _ := os.ReadFile(lockFile); strings.TrimSpace(string(b)) != strconv.Itoa(first.Cmd.Process.Pid) {
		t.Fatalf("killed engine's lock file holds %q, want its pid %d", b, first.Cmd.Process.Pid)
	}

	// Same data dir (lock file with a dead pid) and same port.
	second := startEngine(t, bin, dir, port)
	if b, _ := os.ReadFile(lockFile); strings.TrimSpace(string(b)) != strconv.Itoa(second.Cmd.Process.Pid) {
		t.Errorf("lock file holds %q, want the new engine's pid %d", b, second.Cmd.Process.Pid)
	}
	// The exit status is not checked: a SIGTERM this soon after start can
	// catch the local worker adopting VMs, which then exits 1 ("worker:
	// loading records: context canceled"); that is the worker's business.
	if err := second.Term(30 * time.Second); err != nil && !second.Exited() {
		t.Fatalf("second engine: %v\n%s", err, second.Output())
	}
	if b, _ := os.ReadFile(lockFile); len(b) != 0 {
		t.Errorf("lock file holds %q after a clean stop, want it empty", b)
	}
}

// With an external server (--nats-url) the engine still keeps its files and,
// with --with-worker, the VM work directories in the data dir: it locks it
// before connecting anywhere.
func TestRunEngineExternalNATSLocksDataDir(t *testing.T) {
	dir := t.TempDir()
	held, err := app.LockDataDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Release()
	o := app.EngineOptions{DataDir: dir, LogLevel: "error", WithWorker: true}
	o.Conn.URL = "nats://127.0.0.1:1" // nothing there; must not be reached
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	err = app.RunEngine(ctx, o)
	var inUse *app.DataDirInUseError
	if !errors.As(err, &inUse) {
		t.Fatalf("RunEngine on a locked data dir: got %v, want DataDirInUseError", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("RunEngine took %s to give up", took)
	}
	if inUse.PID != os.Getpid() || inUse.Path != filepath.Join(dir, "engine.lock") {
		t.Errorf("error names pid %d and %s, want %d and %s", inUse.PID, inUse.Path, os.Getpid(), filepath.Join(dir, "engine.lock"))
	}
	if _, err := os.Stat(filepath.Join(dir, "engine-id")); err == nil {
		t.Errorf("RunEngine wrote engine-id into a data dir it could not lock")
	}
}

func TestEngineRefusesBadQuota(t *testing.T) {
	bin := testenv.Binaries(t)
	out, code := runEngine(t, bin, "--data-dir", filepath.Join(t.TempDir(), "data"), "--listen", testenv.Addr(testenv.FreePort(t)), "--quota", "ci-")
	if code == 0 || !strings.Contains(out, `--quota "ci-": want PREFIX=N, e.g. --quota ci-=50`) {
		t.Fatalf("engine with --quota ci-: exit %d\n%s", code, out)
	}
}

// engine creds signs credentials with the data dir's authority, and says
// what is wrong with a request it cannot serve.
func TestEngineCreds(t *testing.T) {
	bin := testenv.Binaries(t)
	dir := filepath.Join(t.TempDir(), "data")
	run := func(args ...string) (string, int) {
		out, errOut, code := testenv.Run(t, 30*time.Second, nil, filepath.Join(bin, "engine"), append([]string{"creds", "--data-dir", dir}, args...)...)
		return out + errOut, code
	}
	if out, code := run("--role", "worker", "--host", "h2"); code != 0 || !strings.Contains(out, "BEGIN NATS USER JWT") || !strings.Contains(out, "BEGIN USER NKEY SEED") {
		t.Fatalf("creds for worker h2: exit %d\n%s", code, out)
	}
	file := filepath.Join(t.TempDir(), "alice.creds")
	if out, code := run("--role", "operator", "--name", "alice", "-o", file); code != 0 {
		t.Fatalf("creds -o: exit %d\n%s", code, out)
	}
	if st, err := os.Stat(file); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("%s: %v %v", file, err, st.Mode())
	}
	if out, code := run("--server-config"); code != 0 || !strings.Contains(out, "resolver: MEMORY") || !strings.Contains(out, "operator: ") {
		t.Fatalf("--server-config: exit %d\n%s", code, out)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--role", "worker"}, "--role worker needs --host"},
		{[]string{"--role", "viewer", "--host", "h1"}, "--host is for --role worker only"},
		{[]string{"--role", "root"}, `unknown role "root"`},
		{[]string{"--role", "worker", "--host", "H 1"}, "host"},
	} {
		if out, code := run(c.args...); code == 0 || !strings.Contains(out, c.want) {
			t.Errorf("creds %v: exit %d, want an error with %q\n%s", c.args, code, c.want, out)
		}
	}
}

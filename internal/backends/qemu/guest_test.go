package qemu_test

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"golang.org/x/crypto/ssh"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/conformance"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/provision"
)

func TestConformance(t *testing.T) {
	t.Parallel()
	img := guestImage(t)
	conformance.Run(t, conformance.Config{
		New: func(t *testing.T) backends.Hypervisor {
			return &readyWaiter{Backend: newBackend(t, qemu.Options{}), offset: map[string]int64{}}
		},
		Spec:        func(t *testing.T, name string) api.VmSpec { return testSpec(img, name) },
		ConsoleKind: api.ConsoleUnixSocket,
		StopTimeout: 20 * time.Second,
		CallTimeout: bootTimeout + time.Minute,
	})
}

// TestGuest boots one guest on user networking and checks what it shows
// through the backend: console, seed, SSH forward, adoption by a new
// Backend on the same data dir, and an ACPI stop.
func TestGuest(t *testing.T) {
	t.Parallel()
	img := guestImage(t)
	dataDir := shortTempDir(t)
	b := newBackend(t, qemu.Options{DataDir: dataDir})
	spec := testSpec(img, "guest1")
	spec.CloudInit = &api.CloudInitConfig{InstanceID: "iid-guest1-42", Hostname: "web-one"}
	priv, pub, err := provision.NewKey("test@vmherd")
	if err != nil {
		t.Fatal(err)
	}
	spec.SSH = &api.SshConfig{User: "vm", PublicKey: pub}
	ctx := ctxT(t, bootTimeout+2*time.Minute)
	h, err := b.Prepare(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Destroy(context.Background(), h) })
	if qd(h).SSHPort == 0 || !strings.HasPrefix(qd(h).MAC, "02:") {
		t.Fatalf("handle without SSH port or local MAC: %+v", h)
	}
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	if h.PID == 0 || qd(h).Accel == "" || qd(h).VNC == "" || h.StartedAt.IsZero() {
		t.Fatalf("started handle is missing PID/Accel/VNC/StartedAt: %+v", h)
	}
	log := waitConsole(t, qd(h).SerialLog, 0, guestimage.ReadyMarker, bootTimeout)
	for _, want := range []string{"instance-id: iid-guest1-42", "local-hostname: web-one"} {
		if !strings.Contains(log, want) {
			t.Errorf("console log lacks %q:\n%s", want, log)
		}
	}
	ip, err := b.GuestIP(ctx, h)
	if err != nil || ip != "127.0.0.1" {
		t.Fatalf("GuestIP = %q, %v; want 127.0.0.1", ip, err)
	}
	banner, err := readBanner("127.0.0.1:"+strconv.Itoa(qd(h).SSHPort), time.Minute)
	if err != nil || !strings.HasPrefix(banner, guestimage.SSHBanner) {
		t.Fatalf("banner on the SSH forward = %q, %v; want %q", banner, err, guestimage.SSHBanner)
	}
	// A real SSH login as the seed's user, with its key, checking the
	// host key the guest printed on its console.
	hostKeys, err := provision.HostKeys([]byte(log))
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	cl, err := ssh.Dial("tcp", "127.0.0.1:"+strconv.Itoa(qd(h).SSHPort), provision.ClientConfig("vm", signer, hostKeys))
	if err != nil {
		b, _ := os.ReadFile(qd(h).SerialLog)
		t.Fatalf("ssh login as vm: %v\nconsole:\n%s", err, b)
	}
	sess, err := cl.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	out, err := sess.CombinedOutput("id -un; hostname")
	cl.Close()
	if err != nil || string(out) != "vm\nweb-one\n" {
		t.Fatalf("ssh id -un; hostname: %q, %v", out, err)
	}
	ep, err := b.ConsoleEndpoint(h)
	if err != nil || ep.Kind != api.ConsoleUnixSocket || ep.Path != qd(h).SerialSock || ep.LogPath != qd(h).SerialLog {
		t.Fatalf("ConsoleEndpoint = %+v, %v", ep, err)
	}
	if _, err := os.Stat(ep.Path); err != nil {
		t.Fatalf("serial socket: %v", err)
	}

	// A worker restart: a new Backend on the same data dir adopts it.
	b2 := newBackend(t, qemu.Options{DataDir: dataDir})
	ah, st, err := b2.Adopt(ctx, h, api.StateRunning)
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if st != api.StateRunning || ah.PID != h.PID || ah.ID != h.ID {
		t.Fatalf("Adopt = pid %d id %s state %s; want pid %d id %s running", ah.PID, ah.ID, st, h.PID, h.ID)
	}
	// Start through the new Backend is a no-op on the running VM.
	if sh, err := b2.Start(ctx, ah); err != nil || sh.PID != h.PID {
		t.Fatalf("Start of a running adopted VM = pid %d, %v; want pid %d", sh.PID, err, h.PID)
	}

	// The guest honours ACPI: the stop needs no signal.
	start := time.Now()
	sh, err := b2.Stop(ctx, ah, 60*time.Second)
	if err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if qd(sh).Extra[qemu.ExtraStopPath] != qemu.StopPathACPI || sh.PID != 0 {
		t.Fatalf("Stop path %q pid %d, want %q pid 0", qd(sh).Extra[qemu.ExtraStopPath], sh.PID, qemu.StopPathACPI)
	}
	t.Logf("ACPI stop took %v", time.Since(start))
	for _, bk := range []*qemu.Backend{b, b2} {
		if st, err := bk.State(ctx, h); err != nil || st != api.StateStopped {
			t.Fatalf("State after Stop = %s, %v", st, err)
		}
	}
	for _, f := range []string{qd(h).QMPSocket, qd(h).SerialSock, h.WorkDir + "/qemu.pid"} {
		if _, err := os.Stat(f); err == nil {
			t.Errorf("%s left behind after Stop", f)
		}
	}
	// Stopping a stopped VM is fine.
	if sh, err := b2.Stop(ctx, sh, time.Second); err != nil || qd(sh).Extra[qemu.ExtraStopPath] != qemu.StopPathNone {
		t.Fatalf("second Stop = %v, path %q", err, qd(sh).Extra[qemu.ExtraStopPath])
	}
}

// TestStopIgnoredACPI: a guest that ignores the power button is ended by
// SIGTERM once the timeout has passed.
func TestStopIgnoredACPI(t *testing.T) {
	t.Parallel()
	img := guestImage(t)
	b := newBackend(t, qemu.Options{})
	spec := testSpec(img, "deaf")
	spec.CloudInit = &api.CloudInitConfig{UserData: guestimage.IgnoreACPIUserData}
	ctx := ctxT(t, bootTimeout+time.Minute)
	h, err := b.Prepare(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Destroy(context.Background(), h) })
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	waitConsole(t, qd(h).SerialLog, 0, guestimage.ReadyMarker, bootTimeout)
	waitConsole(t, qd(h).SerialLog, 0, "ignoring the ACPI power button", time.Second)
	const timeout = 3 * time.Second
	start := time.Now()
	sh, err := b.Stop(ctx, h, timeout)
	if err != nil {
		t.Fatalf("Stop: %v", err)
	}
	took := time.Since(start)
	if p := qd(sh).Extra[qemu.ExtraStopPath]; p != qemu.StopPathTerm && p != qemu.StopPathKill {
		t.Fatalf("stop path = %q, want a signal", p)
	}
	if took < timeout {
		t.Fatalf("Stop returned after %v, before the %v timeout", took, timeout)
	}
	if st, err := b.State(ctx, h); err != nil || st != api.StateStopped {
		t.Fatalf("State = %s, %v; want stopped", st, err)
	}
	if syscall.Kill(h.PID, 0) == nil && procAlive(h.PID) {
		t.Fatalf("QEMU pid %d still alive", h.PID)
	}
}

// TestWatchKill: kill -9 of QEMU is reported once, with the right ID and PID.
func TestWatchKill(t *testing.T) {
	t.Parallel()
	img := guestImage(t)
	b := newBackend(t, qemu.Options{WatchInterval: 200 * time.Millisecond})
	ctx := ctxT(t, 2*time.Minute)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	exits := b.Watch(wctx)
	h, err := b.Prepare(ctx, testSpec(img, "victim"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Destroy(context.Background(), h) })
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(h.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-exits:
		if e.Handle.ID != h.ID || e.Handle.PID != h.PID || e.Handle.Name != h.Name || e.Reason == "" {
			t.Fatalf("exit = %+v, want id %s pid %d", e, h.ID, h.PID)
		}
		t.Logf("exit reason: %s", e.Reason)
	case <-time.After(30 * time.Second):
		t.Fatal("no exit reported for a killed QEMU")
	}
	select {
	case e := <-exits:
		t.Fatalf("second exit reported: %+v", e)
	case <-time.After(time.Second):
	}
	if st, err := b.State(ctx, h); err != nil || st != api.StateStopped {
		t.Fatalf("State after kill = %s, %v; want stopped", st, err)
	}
	// A stop is not an exit: restart, stop, nothing reported.
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Stop(ctx, h, time.Second); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-exits:
		t.Fatalf("exit reported for a commanded stop: %+v", e)
	case <-time.After(time.Second):
	}
}

// TestReusedPID: a pidfile naming a live process that is not this VM's
// QEMU does not make the VM read as running.
func TestReusedPID(t *testing.T) {
	t.Parallel()
	img := guestImage(t)
	b := newBackend(t, qemu.Options{})
	ctx := ctxT(t, time.Minute)
	h, err := b.Prepare(ctx, testSpec(img, "reuse"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Destroy(context.Background(), h)
	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sleeper.Process.Kill(); _ = sleeper.Wait() }()
	for _, pid := range []int{sleeper.Process.Pid, os.Getpid()} {
		if err := os.WriteFile(h.WorkDir+"/qemu.pid", []byte(strconv.Itoa(pid)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		h.PID = pid
		if st, err := b.State(ctx, h); err != nil || st != api.StatePrepared {
			t.Fatalf("State with a foreign pid %d = %s, %v; want prepared", pid, st, err)
		}
		if _, err := b.Suspend(ctx, h); err == nil {
			t.Fatalf("Suspend of a VM whose pidfile names pid %d succeeded", pid)
		}
		if sh, err := b.Stop(ctx, h, time.Second); err != nil || qd(sh).Extra[qemu.ExtraStopPath] != qemu.StopPathNone {
			t.Fatalf("Stop = %v, path %q; want a no-op", err, qd(sh).Extra[qemu.ExtraStopPath])
		}
	}
	if err := sleeper.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("Stop signalled the unrelated process: %v", err)
	}
}

func procAlive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && i+2 < len(s) && s[i+2] != 'Z'
}

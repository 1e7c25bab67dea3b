package e2e_test

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/relay"
	"github.com/vmherd/vmherd/internal/testenv"
)

// A tunnel reaches a VM's guest only while the VM runs (issue #22 item
// 8): `vmctl proxy VM 22` on a prepared, suspended or stopped VM was
// connected to whatever listened on the host port its record names.
// Now each is refused with the VM's state, and nothing listening there
// is reached.
func TestTunnelOnlyToRunningGuest(t *testing.T) {
	image := guestimage.EnsureForTest(t)
	dataDir := t.TempDir()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	q := newQEMU(t, dataDir)
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: q}, Default: api.BackendQEMU,
		ImageRoots: []string{filepath.Dir(image)}, VMDirs: []string{filepath.Join(dataDir, "vms")}})
	env.WaitHost(eng, "h1")
	t.Cleanup(func() { _ = q.Destroy(context.Background(), api.VmHandle{Name: "tun1", Backend: api.BackendQEMU}) })
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// impostor listens on the VM's forwarded port while QEMU does not,
	// and counts who reached it.
	impostor := func(port int) (reached func() int, stop func()) {
		t.Helper()
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			t.Fatalf("listening on the VM's port %d: %v", port, err)
		}
		n := make(chan struct{}, 16)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				_, _ = c.Write([]byte("SSH-2.0-not-the-guest\r\n"))
				_ = c.Close()
				n <- struct{}{}
			}
		}()
		return func() int { return len(n) }, func() { _ = ln.Close() }
	}
	refused := func(state string, reached func() int) {
		t.Helper()
		a, b := net.Pipe()
		defer a.Close()
		go func() { _, _ = io.Copy(io.Discard, a) }()
		errc := make(chan error, 1)
		go func() { errc <- relay.DialTunnel(ctx, env.NC, env.Names, "h1", "tun1", 22, b) }()
		var err error
		select {
		case err = <-errc:
		case <-time.After(20 * time.Second):
			t.Fatalf("a tunnel to the %s VM was opened (still open after 20s; the listener on its port was reached %d times)", state, reached())
		}
		var re *relay.ReplyError
		if !errors.As(err, &re) || re.Code != "409" || !strings.Contains(err.Error(), "is "+state+", not running") {
			t.Fatalf("tunnel to a %s VM: %v, want refused (409) naming the state (the listener on its port was reached %d times)", state, err, reached())
		}
	}

	spec := &api.VmSpec{Backend: api.BackendQEMU, ImagePath: image, MemoryMB: 192, Accel: "auto"}
	prepared := do(t, env, "tun1", "prepare", "tun1-p", api.Command{Spec: spec}, api.TypePrepared)
	port := qemuData(t, prepared.Handle).SSHPort
	if port == 0 {
		t.Fatal("the prepared VM has no forwarded port")
	}
	reached, stop := impostor(port)
	refused("prepared", reached)
	stop()
	if n := reached(); n != 0 {
		t.Fatalf("a tunnel to the prepared VM reached the impostor on its port %d times", n)
	}

	do(t, env, "tun1", "start", "tun1-s", api.Command{}, api.TypeStarted)
	do(t, env, "tun1", "suspend", "tun1-u", api.Command{}, api.TypeSuspended)
	refused("suspended", func() int { return 0 })
	do(t, env, "tun1", "resume", "tun1-r", api.Command{}, api.TypeResumed)
	// Running: the worker connects (QEMU's forward answers, booted or not).
	tctx, tcancel := context.WithCancel(ctx)
	a, b := net.Pipe()
	defer a.Close()
	tunErr := make(chan error, 1)
	go func() { tunErr <- relay.DialTunnel(tctx, env.NC, env.Names, "h1", "tun1", 22, b) }()
	select {
	case err := <-tunErr:
		t.Fatalf("tunnel to the running VM: %v", err)
	case <-time.After(3 * time.Second):
	}
	tcancel()
	<-tunErr

	stopped := do(t, env, "tun1", "stop", "tun1-t", api.Command{TimeoutS: 2}, api.TypeStopped)
	reached, stop = impostor(qemuData(t, stopped.Handle).SSHPort)
	defer stop()
	refused("stopped", reached)
	if n := reached(); n != 0 {
		t.Fatalf("a tunnel to the stopped VM reached the impostor on its port %d times", n)
	}
}

package qemu_test

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/testenv/require"
)

// bootTimeout bounds a guest boot: about 12s alone under TCG, several times
// that when the package's VMs boot side by side on two cores.
const bootTimeout = 3 * time.Minute

// needQEMU skips when QEMU is not installed (scripts/test fails instead).
func needQEMU(t *testing.T) {
	t.Helper()
	_, err := exec.LookPath("qemu-system-x86_64")
	require.Require(t, err == nil, "qemu-system-x86_64 not installed (apt-get install qemu-system-x86 qemu-utils)")
}

// guestImage returns the test guest, built once per test binary.
func guestImage(t *testing.T) string {
	t.Helper()
	needQEMU(t)
	return guestimage.EnsureForTest(t)
}

// testLogger sends the backend's log to the test log.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tlogWriter struct{ t *testing.T }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	defer func() { _ = recover() }() // a log line after the test ended
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newBackend returns a Backend on a fresh data dir (short: socket paths
// must fit in 107 bytes).
func newBackend(t *testing.T, o qemu.Options) *qemu.Backend {
	t.Helper()
	if o.DataDir == "" {
		o.DataDir = shortTempDir(t)
	}
	if o.Logger == nil {
		o.Logger = testLogger(t)
	}
	if o.Accel == "" {
		o.Accel = qemu.AccelAuto
	}
	b, err := qemu.New(o)
	if err != nil {
		t.Fatalf("qemu.New: %v", err)
	}
	return b
}

func shortTempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vmh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func testSpec(img, name string) api.VmSpec {
	return api.VmSpec{Name: name, Backend: api.BackendQEMU, ImagePath: img, Vcpus: 1, MemoryMB: 128,
		Network: &api.NetworkConfig{Type: api.NetworkUser}}
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// logSize is the console log's size now: what a later boot prints starts there.
func logSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

// waitConsole waits until the console log, from offset on, contains want,
// and returns that part of the log.
func waitConsole(t *testing.T, path string, offset int64, want string, timeout time.Duration) string {
	t.Helper()
	s, err := waitConsoleErr(path, offset, want, timeout)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return s
}

func waitConsoleErr(path string, offset int64, want string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	var got string
	for {
		if b, err := os.ReadFile(path); err == nil && int64(len(b)) >= offset {
			got = string(b[offset:])
			if strings.Contains(got, want) {
				return got, nil
			}
		}
		if time.Now().After(deadline) {
			return got, &consoleTimeout{path, want, timeout, got}
		}
		time.Sleep(200 * time.Millisecond)
	}
}

type consoleTimeout struct {
	path, want string
	d          time.Duration
	got        string
}

func (e *consoleTimeout) Error() string {
	got := e.got
	if len(got) > 3000 {
		got = got[len(got)-3000:]
	}
	return "console " + e.path + " did not show " + strconv.Quote(e.want) + " within " + e.d.String() + "; it shows:\n" + got
}

// readBanner connects to addr and reads the first line, retrying until
// timeout (the forward accepts before the guest listens).
func readBanner(addr string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil {
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if err == nil || (err == io.EOF && line != "") {
				return strings.TrimSpace(line), nil
			}
			lastErr = err
		} else {
			lastErr = err
		}
		time.Sleep(300 * time.Millisecond)
	}
	return "", lastErr
}

// readyWaiter wraps a backend so Stop first waits for the guest of the
// current boot to be ready: the conformance suite stops right after Start,
// and a guest still in its kernel cannot act on the ACPI power button.
type readyWaiter struct {
	*qemu.Backend
	mu     sync.Mutex
	offset map[string]int64
}

func (w *readyWaiter) Start(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	st, _ := w.Backend.State(ctx, h)
	ep, _ := w.Backend.ConsoleEndpoint(h)
	off := logSize(ep.LogPath)
	out, err := w.Backend.Start(ctx, h)
	if err == nil && st != api.StateRunning && st != api.StateSuspended {
		w.mu.Lock()
		w.offset[h.Name] = off
		w.mu.Unlock()
	}
	return out, err
}

func (w *readyWaiter) Stop(ctx context.Context, h api.VmHandle, timeout time.Duration) (api.VmHandle, error) {
	w.mu.Lock()
	off, ok := w.offset[h.Name]
	w.mu.Unlock()
	if ok {
		ep, _ := w.Backend.ConsoleEndpoint(h)
		if _, err := waitConsoleErr(ep.LogPath, off, guestimage.ReadyMarker, bootTimeout); err != nil {
			return h, err
		}
	}
	return w.Backend.Stop(ctx, h, timeout)
}

var _ backends.Hypervisor = (*readyWaiter)(nil)

// qd is the QEMU data of h.
func qd(h api.VmHandle) qemu.HandleData {
	d, err := qemu.DataOf(h)
	if err != nil {
		panic(err)
	}
	return d
}

package qemu

// The QMP steps of the backend against go-qemu's qmptest monitor, which
// stands in for QEMU through the qmp.Monitor interface: no QEMU, no
// socket. The real-QEMU tests (guest_test.go) and the socket-level fake
// (TestQMPBoundedByContext) stay as they are.

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"github.com/digitalocean/go-qemu/qmp/qmptest"

	"github.com/vmherd/vmherd/api"
)

// fakeQEMU answers QMP commands as a QEMU's run state would: stop pauses,
// cont runs (each seen by query-status after lag more polls), and records
// every command it is sent.
type fakeQEMU struct {
	mu      sync.Mutex
	status  string
	next    string // the status a stop or cont leads to, once lag polls have passed
	lag     int
	sticky  bool // stop and cont change nothing (a QEMU that never gets there)
	cmds    []string
	fail    map[string]error // command -> the error QMP answers
	replies map[string]any   // command -> the whole reply, instead of the model's
	vnc     map[string]any
}

func (q *fakeQEMU) run(cmd qmp.Command) (any, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.cmds = append(q.cmds, cmd.Execute)
	if err := q.fail[cmd.Execute]; err != nil {
		return nil, err
	}
	if r, ok := q.replies[cmd.Execute]; ok {
		return r, nil
	}
	ret := func(v any) (any, error) { return map[string]any{"return": v}, nil }
	switch cmd.Execute {
	case "query-status":
		if q.next != "" {
			if q.lag == 0 {
				q.status, q.next = q.next, ""
			} else {
				q.lag--
			}
		}
		return ret(map[string]any{"status": q.status, "running": q.status == "running", "singlestep": false})
	case "stop", "cont":
		if !q.sticky {
			q.next = map[string]string{"stop": "paused", "cont": "running"}[cmd.Execute]
		}
		return ret(map[string]any{})
	case "system_powerdown":
		return ret(map[string]any{})
	case "query-vnc":
		if q.vnc == nil {
			return ret(map[string]any{"enabled": false})
		}
		return ret(q.vnc)
	}
	return nil, errors.New("The command " + cmd.Execute + " has not been found")
}

func (q *fakeQEMU) sent() []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	return slices.Clone(q.cmds)
}

func (q *fakeQEMU) monitor() *monitor { return &monitor{mon: qmptest.NewMonitor(q.run)} }

func qmpCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// query-status's run state maps to the VM's state.
func TestQMPStatusMapping(t *testing.T) {
	t.Parallel()
	for status, want := range map[string]api.VmState{
		"running": api.StateRunning, "paused": api.StateSuspended, "suspended": api.StateSuspended,
		"prelaunch": api.StateSuspended, "shutdown": api.StateStopped, "guest-panicked": api.StateFailed,
		"internal-error": api.StateFailed, "io-error": api.StateFailed, "inmigrate": api.StateRunning,
		"postmigrate": api.StateRunning, "finish-migrate": api.StateRunning,
	} {
		q := &fakeQEMU{status: status}
		st, err := q.monitor().status(qmpCtx(t, 5*time.Second))
		if err != nil {
			t.Fatalf("%s: %v", status, err)
		}
		if st.Status != status || st.Running != (status == "running") || mapStatus(st.Status) != want {
			t.Errorf("query-status %q: %+v maps to %s, want %s", status, st, mapStatus(st.Status), want)
		}
	}
}

// Suspend is stop then polling until QEMU reports paused; resume is cont
// until running; neither is sent when QEMU is already there; a QEMU that
// never gets there fails when the context ends, saying where it is.
func TestQMPSuspendResumeSequence(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		q         *fakeQEMU
		cmd, want string
		sent      []string
		err       string
	}{
		{"suspend", &fakeQEMU{status: "running"}, "stop", "paused",
			[]string{"query-status", "stop", "query-status"}, ""},
		{"suspend, paused a moment later", &fakeQEMU{status: "running", lag: 2}, "stop", "paused",
			[]string{"query-status", "stop", "query-status", "query-status", "query-status"}, ""},
		{"suspend a paused vm", &fakeQEMU{status: "paused"}, "stop", "paused",
			[]string{"query-status"}, ""},
		{"resume", &fakeQEMU{status: "paused"}, "cont", "running",
			[]string{"query-status", "cont", "query-status"}, ""},
		{"resume a running vm", &fakeQEMU{status: "running"}, "cont", "running",
			[]string{"query-status"}, ""},
		{"stop refused", &fakeQEMU{status: "running", fail: map[string]error{"stop": errors.New("not allowed now")}}, "stop", "paused",
			[]string{"query-status", "stop"}, "QMP stop: not allowed now"},
		{"status fails", &fakeQEMU{status: "running", fail: map[string]error{"query-status": errors.New("gone")}}, "stop", "paused",
			[]string{"query-status"}, "QMP query-status: gone"},
		{"never paused", &fakeQEMU{status: "running", sticky: true}, "stop", "paused",
			nil, "context deadline exceeded"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tc.q.monitor().toStatus(qmpCtx(t, 300*time.Millisecond), tc.cmd, tc.want)
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("err %v, want %q", err, tc.err)
			}
			if tc.sent != nil && !slices.Equal(tc.q.sent(), tc.sent) {
				t.Fatalf("sent %v, want %v", tc.q.sent(), tc.sent)
			}
			if tc.sent == nil && len(tc.q.sent()) < 3 {
				t.Fatalf("sent %v: no polling", tc.q.sent())
			}
		})
	}
}

// The ACPI power button: a paused guest is continued first (it could not
// see the button); a failed status read still presses it; a failed cont
// does not.
func TestQMPPowerdownSequence(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		q    *fakeQEMU
		sent []string
		err  string
	}{
		{"running", &fakeQEMU{status: "running"}, []string{"query-status", "system_powerdown"}, ""},
		{"paused", &fakeQEMU{status: "paused"}, []string{"query-status", "cont", "system_powerdown"}, ""},
		{"status unreadable", &fakeQEMU{status: "paused", fail: map[string]error{"query-status": errors.New("busy")}},
			[]string{"query-status", "system_powerdown"}, ""},
		{"cont refused", &fakeQEMU{status: "paused", fail: map[string]error{"cont": errors.New("no")}},
			[]string{"query-status", "cont"}, "QMP cont: no"},
		{"button refused", &fakeQEMU{status: "running", fail: map[string]error{"system_powerdown": errors.New("no acpi")}},
			[]string{"query-status", "system_powerdown"}, "QMP system_powerdown: no acpi"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tc.q.monitor().powerdown(qmpCtx(t, 5*time.Second))
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("err %v, want %q", err, tc.err)
			}
			if !slices.Equal(tc.q.sent(), tc.sent) {
				t.Fatalf("sent %v, want %v", tc.q.sent(), tc.sent)
			}
		})
	}
}

// A QEMU just started must report running (under KVM, still running a
// moment later), and says where its VNC server listens.
func TestQMPStartedCheck(t *testing.T) {
	t.Parallel()
	unixVNC := map[string]any{"enabled": true, "family": "unix", "host": "", "service": "/d/web1/vnc.sock"}
	for _, tc := range []struct {
		name, accel string
		q           *fakeQEMU
		vnc, err    string
		polls       int
	}{
		{"tcg", AccelTCG, &fakeQEMU{status: "running", vnc: unixVNC}, "unix:/d/web1/vnc.sock", "", 1},
		{"kvm", AccelKVM, &fakeQEMU{status: "running", vnc: unixVNC}, "unix:/d/web1/vnc.sock", "", 6},
		{"kvm that cannot run the guest", AccelKVM, &fakeQEMU{status: "running", next: "internal-error", lag: 1}, "",
			`QEMU reports status "internal-error" instead of running (accel kvm); KVM cannot run this guest on this host: set accel tcg`, 2},
		{"tcg paused", AccelTCG, &fakeQEMU{status: "paused"}, "", `QEMU reports status "paused" instead of running (accel tcg)`, 1},
		{"no vnc", AccelTCG, &fakeQEMU{status: "running"}, "", "", 1},
		{"vnc on tcp", AccelTCG, &fakeQEMU{status: "running", vnc: map[string]any{"enabled": true, "family": "ipv4", "host": "127.0.0.1", "service": "5901"}},
			"127.0.0.1:5901", "", 1},
		{"vnc unreadable", AccelTCG, &fakeQEMU{status: "running", fail: map[string]error{"query-vnc": errors.New("no vnc")}}, "", "QMP query-vnc: no vnc", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			v, err := tc.q.monitor().started(qmpCtx(t, 5*time.Second), tc.accel, time.Millisecond)
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || err.Error() != tc.err) {
				t.Fatalf("err %v, want %q", err, tc.err)
			}
			if v != tc.vnc {
				t.Fatalf("vnc %q, want %q", v, tc.vnc)
			}
			polls := 0
			for _, c := range tc.q.sent() {
				if c == "query-status" {
					polls++
				}
			}
			if polls != tc.polls {
				t.Fatalf("%d status polls (%v), want %d", polls, tc.q.sent(), tc.polls)
			}
		})
	}
}

// Replies that are not what the command returns are errors naming the
// command, never a zero value taken as an answer.
func TestQMPBadReplies(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		reply any
		err   string
	}{
		{"no return", map[string]any{"id": "x"}, "QMP query-status: decoding reply"},
		{"return of another type", map[string]any{"return": []int{1, 2}}, "QMP query-status: decoding reply"},
		{"status of another type", map[string]any{"return": map[string]any{"status": 7}}, "QMP query-status: decoding reply"},
		{"not an object", "running", "QMP query-status: decoding reply"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			q := &fakeQEMU{status: "running", replies: map[string]any{"query-status": tc.reply}}
			st, err := q.monitor().status(qmpCtx(t, 5*time.Second))
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("status %+v, err %v; want %q", st, err, tc.err)
			}
		})
	}
	// A command whose reply is not read (out nil) only needs no error.
	q := &fakeQEMU{status: "running", replies: map[string]any{"stop": "whatever"}}
	if err := q.monitor().run(qmpCtx(t, 5*time.Second), "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	// An unknown command: QEMU's error, with the command's name.
	err := (&fakeQEMU{}).monitor().run(qmpCtx(t, 5*time.Second), "no-such", nil, nil)
	if err == nil || err.Error() != "QMP no-such: The command no-such has not been found" {
		t.Fatalf("unknown command: %v", err)
	}
	// Arguments reach QEMU as the command's arguments.
	var got qmp.Command
	m := &monitor{mon: qmptest.NewMonitor(func(c qmp.Command) (any, error) { got = c; return map[string]any{"return": map[string]any{}}, nil })}
	if err := m.run(qmpCtx(t, 5*time.Second), "object-add", map[string]any{"qom-type": "x", "id": "y"}, nil); err != nil {
		t.Fatal(err)
	}
	if args, ok := got.Args.(map[string]any); got.Execute != "object-add" || !ok || args["qom-type"] != "x" || args["id"] != "y" {
		t.Fatalf("QEMU got %+v", got)
	}
}

// hanging is a monitor whose Run and Connect wait until Disconnect (a
// QEMU that stopped answering), recording the disconnect.
type hanging struct {
	qmp.Monitor
	once   sync.Once
	closed chan struct{}
}

func newHanging() *hanging {
	return &hanging{Monitor: qmptest.NewMonitor(nil), closed: make(chan struct{})}
}

func (h *hanging) Disconnect() error { h.once.Do(func() { close(h.closed) }); return nil }
func (h *hanging) Run([]byte) ([]byte, error) {
	<-h.closed
	return nil, errors.New("use of closed network connection")
}
func (h *hanging) Connect() error {
	select {
	case <-h.closed:
	case <-time.After(200 * time.Millisecond): // a handshake that ends late
	}
	return nil
}

// A command QEMU does not answer ends with its context, and the
// connection is closed (which is what unblocks go-qemu's Run); a
// handshake that outlives its context is abandoned, and the connection
// closed once it returns; a failed handshake closes it at once.
func TestQMPUnansweredAndHandshake(t *testing.T) {
	t.Parallel()
	h := newHanging()
	m := &monitor{mon: h}
	start := time.Now()
	_, err := m.status(qmpCtx(t, 100*time.Millisecond))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.HasPrefix(err.Error(), "QMP query-status: ") {
		t.Fatalf("unanswered query-status: %v", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Fatalf("took %s", time.Since(start))
	}
	select {
	case <-h.closed:
	default:
		t.Fatal("the connection was not closed")
	}

	h = newHanging()
	if _, err := connect(qmpCtx(t, 20*time.Millisecond), h); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "QMP handshake") {
		t.Fatalf("late handshake: %v", err)
	}
	select {
	case <-h.closed:
	case <-time.After(5 * time.Second):
		t.Fatal("the abandoned handshake's connection was never closed")
	}

	failing := &failingHandshake{hanging: newHanging()}
	if _, err := connect(qmpCtx(t, 5*time.Second), failing); err == nil || !strings.Contains(err.Error(), "QMP handshake: no banner") {
		t.Fatalf("failed handshake: %v", err)
	}
	select {
	case <-failing.closed:
	default:
		t.Fatal("a failed handshake's connection was not closed")
	}

	ok, err := connect(qmpCtx(t, 5*time.Second), qmptest.NewMonitor((&fakeQEMU{status: "running"}).run))
	if err != nil {
		t.Fatal(err)
	}
	if st, err := ok.status(qmpCtx(t, 5*time.Second)); err != nil || st.Status != "running" {
		t.Fatalf("after the handshake: %+v %v", st, err)
	}
}

type failingHandshake struct{ *hanging }

func (f *failingHandshake) Connect() error { return errors.New("no banner") }

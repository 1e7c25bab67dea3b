package e2e_test

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/testenv"
)

const bootWait = 3 * time.Minute

func newQEMU(t *testing.T, dataDir string) *qemu.Backend {
	t.Helper()
	_, err := os.Stat("/usr/bin/qemu-system-x86_64")
	testenv.Require(t, err == nil, "qemu-system-x86_64 is not installed")
	b, err := qemu.New(qemu.Options{DataDir: dataDir, Host: "h1", Logger: testenv.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func query(t *testing.T, env *testenv.Env, name, endpoint string, out any) error {
	t.Helper()
	var m *nats.Msg
	var err error
	deadline := time.Now().Add(20 * time.Second)
	for {
		// A worker that just started may not serve queries yet.
		m, err = env.NC.Request(env.Names.Query("h1")+"."+endpoint, []byte(`{"vm":"`+name+`"}`), 10*time.Second)
		if !errors.Is(err, nats.ErrNoResponders) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	if code := m.Header.Get("Nats-Service-Error-Code"); code != "" {
		return &queryError{m.Header.Get("Nats-Service-Error")}
	}
	return jsonUnmarshal(m.Data, out)
}

type queryError struct{ msg string }

func (e *queryError) Error() string { return e.msg }

func consoleLog(t *testing.T, env *testenv.Env, name string) string {
	var ep api.ConsoleEndpoint
	if err := query(t, env, name, "console_endpoint", &ep); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(ep.LogPath)
	return string(b)
}

// qemuData is the QEMU backend's data of h.
func qemuData(t *testing.T, h *api.VmHandle) qemu.HandleData {
	t.Helper()
	if h == nil {
		t.Fatal("no handle")
	}
	d, err := qemu.DataOf(*h)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func liveState(t *testing.T, env *testenv.Env, name string) api.VmState {
	var st api.StateReply
	if err := query(t, env, name, "state", &st); err != nil {
		t.Fatalf("state query for %s: %v", name, err)
	}
	return st.State
}

func do(t *testing.T, env *testenv.Env, name, action, id string, cmd api.Command, want api.EventType) *api.Event {
	t.Helper()
	env.SendCmd(name, action, id, cmd)
	ev := env.Result(name, id, bootWait)
	if ev.Type != want {
		t.Fatalf("%s %s: %s (%s%s), want %s", action, name, ev.Type, ev.Reason, ev.Error, want)
	}
	return ev
}

// The QEMU backend through engine, worker and NATS with the repo's test
// guest: cloud-init seen by the guest, guest IP and SSH port forward,
// suspend/resume confirmed by QMP, ACPI stop, forced stop of a guest that
// ignores ACPI, destroy leaving nothing behind; then drift: kill -9 of
// QEMU gives one exited event, and a restarted worker re-adopts running VMs.
func TestQEMUEndToEnd(t *testing.T) {
	image := guestimage.EnsureForTest(t)
	dataDir := t.TempDir()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	q := newQEMU(t, dataDir)
	w := env.StartWorker(testenv.WorkerConfig{Host: "h1", Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: q}, Default: api.BackendQEMU, Reconcile: time.Second,
		ImageRoots: []string{filepath.Dir(image)}, VMDirs: []string{filepath.Join(dataDir, "vms")}})
	env.WaitHost(eng, "h1")
	t.Cleanup(func() {
		for _, n := range []string{"q1", "q2"} {
			_ = q.Destroy(context.Background(), api.VmHandle{Name: n, Backend: api.BackendQEMU})
		}
	})

	spec := func(name string, userData string) *api.VmSpec {
		return &api.VmSpec{Backend: api.BackendQEMU, ImagePath: image, MemoryMB: 192, Accel: "auto",
			CloudInit: &api.CloudInitConfig{InstanceID: "iid-" + name, Hostname: "host-" + name, UserData: userData}}
	}
	do(t, env, "q1", "prepare", "q1-p", api.Command{Spec: spec("q1", "#cloud-config\n")}, api.TypePrepared)
	do(t, env, "q2", "prepare", "q2-p", api.Command{Spec: spec("q2", "#cloud-config\nvmherd-ignore-acpi: true\n")}, api.TypePrepared)
	started := do(t, env, "q1", "start", "q1-s", api.Command{}, api.TypeStarted)
	if started.Handle.PID == 0 || qemuData(t, started.Handle).Accel == "" {
		t.Fatalf("started handle %+v", started.Handle)
	}
	do(t, env, "q2", "start", "q2-s", api.Command{}, api.TypeStarted)

	env.WaitFor("q1 to boot and read its seed", bootWait, func() bool {
		l := consoleLog(t, env, "q1")
		return strings.Contains(l, "VMHERD-GUEST-READY") && strings.Contains(l, "instance-id: iid-q1") && strings.Contains(l, "local-hostname: host-q1")
	})
	var ip api.GuestIPReply
	if err := query(t, env, "q1", "guest_ip", &ip); err != nil || ip.IP != "127.0.0.1" || ip.Port == 0 {
		t.Fatalf("guest_ip = %+v, %v", ip, err)
	}
	if banner := readBanner(t, net.JoinHostPort(ip.IP, strconv.Itoa(ip.Port))); !strings.HasPrefix(banner, "SSH-") {
		t.Fatalf("forwarded port answered %q, want an SSH banner", banner)
	}
	// Live counters through the worker's stats query, as vmctl info and
	// top ask for them.
	var st api.StatsReply
	var lat []time.Duration
	for range 10 {
		began := time.Now()
		if err := query(t, env, "q1", "stats", &st); err != nil {
			t.Fatalf("stats: %v", err)
		}
		lat = append(lat, time.Since(began))
	}
	slices.Sort(lat)
	t.Logf("stats query over NATS: min %s, median %s, max %s (10 queries)", lat[0].Round(time.Microsecond), lat[5].Round(time.Microsecond), lat[9].Round(time.Microsecond))
	if st.VM != "q1" || st.Host != "h1" || st.Backend != api.BackendQEMU || st.State != api.StateRunning || st.CPUNS <= 0 || st.RSSBytes <= 0 ||
		st.MemoryBytes != 192<<20 || st.UptimeMS <= 0 || len(st.Vcpus) != 1 || len(st.Disks) == 0 || st.NetsUnavailable == "" || st.Simulated {
		t.Fatalf("stats of q1: %+v", st)
	}
	// The state query shows what the backend shows of its data: the
	// forwarded port, the accelerator, the display.
	var sr api.StateReply
	if err := query(t, env, "q1", "state", &sr); err != nil {
		t.Fatal(err)
	}
	d := qemuData(t, &sr.Handle)
	if sr.Details["ssh"] != "127.0.0.1:"+strconv.Itoa(ip.Port)+" (on host h1)" || d.SSHPort != ip.Port ||
		sr.Details["accel"] != d.Accel || d.Accel == "" || sr.Details["vnc"] != d.VNC || !strings.HasPrefix(d.VNC, "unix:") {
		t.Fatalf("state details %v with data %+v (guest_ip port %d)", sr.Details, d, ip.Port)
	}

	do(t, env, "q1", "suspend", "q1-u", api.Command{}, api.TypeSuspended)
	if st := liveState(t, env, "q1"); st != api.StateSuspended {
		t.Fatalf("live state after suspend = %s (QMP should say paused)", st)
	}
	do(t, env, "q1", "resume", "q1-r", api.Command{}, api.TypeResumed)
	if st := liveState(t, env, "q1"); st != api.StateRunning {
		t.Fatalf("live state after resume = %s", st)
	}
	stopped := do(t, env, "q1", "stop", "q1-t", api.Command{TimeoutS: 60}, api.TypeStopped)
	if path := qemuData(t, stopped.Handle).Extra[qemu.ExtraStopPath]; path != qemu.StopPathACPI {
		t.Fatalf("q1 stopped by %q, want ACPI power-off", path)
	}
	do(t, env, "q1", "start", "q1-s2", api.Command{}, api.TypeStarted)

	// q2 ignores the power button: killed after the timeout, reported stopped.
	env.WaitFor("q2 to boot", bootWait, func() bool { return strings.Contains(consoleLog(t, env, "q2"), "VMHERD-GUEST-READY") })
	forced := do(t, env, "q2", "stop", "q2-t", api.Command{TimeoutS: 4}, api.TypeStopped)
	if path := qemuData(t, forced.Handle).Extra[qemu.ExtraStopPath]; path != qemu.StopPathTerm && path != qemu.StopPathKill {
		t.Fatalf("q2 stopped by %q, want a signal after the timeout", path)
	}

	// Drift: kill -9 q1's QEMU.
	running := record(t, env, "q1")
	if err := syscall.Kill(running.Handle.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	env.WaitFor("q1 exited and stopped", bootWait, func() bool {
		r := record(t, env, "q1")
		return r != nil && r.State == api.StateStopped
	})
	if n := env.CountType("q1", api.TypeExited); n != 1 {
		t.Fatalf("%d exited events for q1, want 1", n)
	}

	// Re-adoption: restart the worker (a new backend on the same data dir)
	// while q1 runs.
	do(t, env, "q1", "start", "q1-s3", api.Command{}, api.TypeStarted)
	pid := record(t, env, "q1").Handle.PID
	if err := w.Stop(); err != nil {
		t.Fatal(err)
	}
	q2b := newQEMU(t, dataDir)
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: q2b}, Default: api.BackendQEMU, Reconcile: time.Second,
		ImageRoots: []string{filepath.Dir(image)}, VMDirs: []string{filepath.Join(dataDir, "vms")}})
	if st := liveState(t, env, "q1"); st != api.StateRunning {
		t.Fatalf("after the worker restart q1 reads %s, want running", st)
	}
	if r := record(t, env, "q1"); r.State != api.StateRunning || r.Handle.PID != pid {
		t.Fatalf("record after re-adoption: %+v", r)
	}
	do(t, env, "q1", "stop", "q1-t2", api.Command{TimeoutS: 60}, api.TypeStopped)

	// Destroy leaves no work dir and no QEMU process.
	do(t, env, "q1", "destroy", "q1-d", api.Command{}, api.TypeDestroyed)
	do(t, env, "q2", "destroy", "q2-d", api.Command{}, api.TypeDestroyed)
	for _, n := range []string{"q1", "q2"} {
		if _, err := os.Stat(dataDir + "/vms/" + n); !os.IsNotExist(err) {
			t.Errorf("work dir of %s still there after destroy: %v", n, err)
		}
	}
	if err := syscall.Kill(pid, 0); err == nil {
		if b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); !strings.Contains(string(b), ") Z ") {
			t.Errorf("QEMU pid %d still alive after destroy", pid)
		}
	}
	if n := env.CountType("q1", api.TypeExited); n != 1 {
		t.Fatalf("%d exited events for q1 at the end, want 1", n)
	}
	c := env.CheckStreams()
	t.Logf("streams: %s", c)
	env.CheckProjection(wait)
}

func readBanner(t *testing.T, addr string) string {
	t.Helper()
	deadline := time.Now().Add(bootWait)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil {
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if line != "" {
				return strings.TrimSpace(line)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return ""
}

// Bad input to the QEMU backend through the pipeline: each is a failed
// event whose message says what to fix, and destroy leaves nothing behind.
func TestQEMUBadInputEvents(t *testing.T) {
	_, err := os.Stat("/usr/bin/qemu-system-x86_64")
	testenv.Require(t, err == nil, "qemu-system-x86_64 is not installed")
	dataDir := t.TempDir()
	q, err := qemu.New(qemu.Options{DataDir: dataDir, Host: "h1", Logger: testenv.Logger(),
		Firmware: []qemu.FirmwarePair{{Code: "/nonexistent/OVMF_CODE.fd", Vars: "/nonexistent/OVMF_VARS.fd"}}})
	if err != nil {
		t.Fatal(err)
	}
	image := guestimage.EnsureForTest(t)
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	// Image roots: the guest cache and the data dir (for notes.txt), but
	// never the VMs' directories under it.
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: q}, Default: api.BackendQEMU,
		ImageRoots: []string{filepath.Dir(image), dataDir}, VMDirs: []string{filepath.Join(dataDir, "vms")}})
	env.WaitHost(eng, "h1")
	notImage := dataDir + "/notes.txt"
	if err := os.WriteFile(notImage, []byte("not a disk image\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Another VM's disk, and a symlink in a root that leads out of it.
	overlay := filepath.Join(dataDir, "vms", "other", "overlay.qcow2")
	if err := os.MkdirAll(filepath.Dir(overlay), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(overlay, make([]byte, 2<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	escape := filepath.Join(dataDir, "escape.qcow2")
	if err := os.Symlink("/etc/shadow", escape); err != nil {
		t.Fatal(err)
	}
	dotdot := filepath.Dir(image) + "/../../../../../../../../etc/shadow"
	cases := []struct {
		name string
		spec api.VmSpec
		want []string
	}{
		{"missing", api.VmSpec{Backend: api.BackendQEMU, ImagePath: "/nonexistent/base.qcow2"}, []string{"/nonexistent/base.qcow2", "does not exist"}},
		{"notimage", api.VmSpec{Backend: api.BackendQEMU, ImagePath: notImage}, []string{notImage}},
		{"nouefi", api.VmSpec{Backend: api.BackendQEMU, ImagePath: image, UEFI: true}, []string{"OVMF", "ovmf"}},
		// Trust: every path outside the roots is refused, naming the rule.
		{"shadow", api.VmSpec{Backend: api.BackendQEMU, ImagePath: "/etc/shadow"}, []string{`"/etc/shadow" is outside every image root (this worker's image roots: `}},
		{"dotdot", api.VmSpec{Backend: api.BackendQEMU, ImagePath: dotdot}, []string{"resolves to /etc/shadow, which is outside every image root"}},
		{"symlink", api.VmSpec{Backend: api.BackendQEMU, ImagePath: escape}, []string{"resolves to /etc/shadow, which is outside every image root"}},
		{"overlay", api.VmSpec{Backend: api.BackendQEMU, ImagePath: overlay}, []string{"is inside the VMs' work directory"}},
		{"relative", api.VmSpec{Backend: api.BackendQEMU, ImagePath: "images/base.qcow2"}, []string{"is not an absolute path"}},
	}
	for _, c := range cases {
		ev := do(t, env, c.name, "prepare", c.name+"-p", api.Command{Spec: &c.spec}, api.TypeFailed)
		hit := false
		for _, w := range c.want {
			hit = hit || strings.Contains(ev.Error, w)
		}
		if !hit {
			t.Errorf("%s: error %q mentions none of %q", c.name, ev.Error, c.want)
		}
		do(t, env, c.name, "destroy", c.name+"-d", api.Command{}, api.TypeDestroyed)
		if _, err := os.Stat(dataDir + "/vms/" + c.name); !os.IsNotExist(err) {
			t.Errorf("%s: work dir left behind: %v", c.name, err)
		}
	}
	env.AllEvents() // every event valid against its schema
}

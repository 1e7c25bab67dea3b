package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/guestimage"
)

// qemuOps are the operations figure 5 compares, in the order they run.
var qemuOps = []string{"start", "suspend", "resume", "stop", "destroy"}

// QEMUOp is one operation's medians.
type QEMUOp struct {
	Op       string  `json:"op"`
	VmherdMs float64 `json:"vmherd_median_ms"`
	DirectMs float64 `json:"direct_median_ms"`
	AddedMs  float64 `json:"added_median_ms"`
	Ratio    float64 `json:"ratio"`
	// BackendMs is the QEMU backend's own call inside the worker; the rest
	// of vmherd's time (PipelineMs) is NATS, the engine and the worker.
	BackendMs  float64   `json:"backend_call_median_ms"`
	PipelineMs float64   `json:"pipeline_median_ms"`
	VmherdAll  []float64 `json:"vmherd_ms"`
	BackendAll []float64 `json:"backend_call_ms"`
	DirectAll  []float64 `json:"direct_ms"`
}

// QEMU is figure 5.
type QEMU struct {
	Skipped     string   `json:"skipped,omitempty"`
	Image       string   `json:"image,omitempty"`
	QEMUVersion string   `json:"qemu_version,omitempty"`
	Accel       string   `json:"accel,omitempty"`
	Iterations  int      `json:"iterations"`
	PrepareMs   float64  `json:"vmherd_prepare_median_ms,omitempty"`
	BootMs      float64  `json:"guest_boot_median_ms,omitempty"`
	Ops         []QEMUOp `json:"ops,omitempty"`
	Libvirt     string   `json:"libvirt"`
}

// qemuAvailable says why figure 5 cannot run here, or "".
func qemuAvailable() string {
	for _, b := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(b); err != nil {
			return b + " is not installed (apt-get install qemu-system-x86 qemu-utils)"
		}
	}
	return ""
}

// qemuBench runs iters rounds; each round takes one VM through start,
// suspend, resume, stop (ACPI) and destroy through vmherd (commands over
// NATS to an in-process engine and a worker with the QEMU backend), then
// the same operations done directly on a QEMU launched with the same
// command line shape.
func qemuBench(ctx context.Context, url, dir string, iters int, logf func(string, ...any)) (QEMU, error) {
	res := QEMU{Iterations: iters, Libvirt: libvirtNote()}
	if why := qemuAvailable(); why != "" {
		res.Skipped = why
		return res, nil
	}
	if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		res.QEMUVersion = strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	cache, err := guestimage.DefaultCacheDir() // where guestimage.EnsureForTest keeps it
	if err != nil {
		res.Skipped = "no guest image cache dir: " + err.Error()
		return res, nil
	}
	bctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	img, err := guestimage.Build(bctx, cache)
	cancel()
	if err != nil {
		res.Skipped = "test guest image cannot be built: " + err.Error() + " (apt-get install " + strings.Join(guestimage.Packages, " ") + ")"
		return res, nil
	}
	res.Image = img
	warmFile(img)

	qb, err := qemu.New(qemu.Options{DataDir: filepath.Join(dir, "q"), Host: benchHost, Logger: quietLogger()})
	if err != nil {
		res.Skipped = "qemu backend: " + err.Error()
		return res, nil
	}
	tb := newTimed(qb)
	p, err := startPipeline(ctx, pipelineConfig{
		URL: url, StateDir: filepath.Join(dir, "engine"),
		Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: tb}, Default: api.BackendQEMU,
		ImageRoots: []string{filepath.Dir(img)},
	})
	if err != nil {
		return res, err
	}
	defer p.close()
	cl, err := newClient(ctx, url)
	if err != nil {
		return res, err
	}
	defer cl.close()

	via := map[string][]float64{}
	inBackend := map[string][]float64{}
	direct := map[string][]float64{}
	var prep, boot []float64
	for i := range iters {
		name := "qb" + strconv.Itoa(i)
		t, bt, accel, seed, err := vmherdRound(ctx, cl, tb, name, img, filepath.Join(dir, "seed"))
		if err != nil {
			return res, fmt.Errorf("round %d through vmherd: %w", i, err)
		}
		res.Accel = accel
		for k, v := range t {
			switch k {
			case "prepare":
				prep = append(prep, v)
			case "boot":
				boot = append(boot, v)
			default:
				via[k] = append(via[k], v)
				inBackend[k] = append(inBackend[k], bt[k])
			}
		}
		d, err := directRound(ctx, img, seed, filepath.Join(dir, "d"+strconv.Itoa(i)), accel)
		if err != nil {
			return res, fmt.Errorf("round %d directly: %w", i, err)
		}
		for k, v := range d {
			direct[k] = append(direct[k], v)
		}
		logf("  qemu round %d: vmherd %v, direct %v", i+1, roundMs(t), roundMs(d))
	}
	res.PrepareMs, res.BootMs = median(prep), median(boot)
	for _, op := range qemuOps {
		o := QEMUOp{Op: op, VmherdMs: median(via[op]), DirectMs: median(direct[op]), BackendMs: median(inBackend[op]),
			VmherdAll: via[op], BackendAll: inBackend[op], DirectAll: direct[op]}
		o.AddedMs = o.VmherdMs - o.DirectMs
		o.PipelineMs = o.VmherdMs - o.BackendMs
		o.Ratio = ratio(o.VmherdMs, o.DirectMs)
		res.Ops = append(res.Ops, o)
	}
	return res, nil
}

func roundMs(m map[string]float64) string {
	var parts []string
	for _, op := range append([]string{"prepare", "boot"}, qemuOps...) {
		if v, ok := m[op]; ok {
			parts = append(parts, fmt.Sprintf("%s=%.0fms", op, v))
		}
	}
	return strings.Join(parts, " ")
}

// vmherdRound prepares a VM through vmherd and times each operation from
// command publish to result event, and the backend call inside it. It
// returns the accelerator QEMU ran with and a copy of the VM's NoCloud
// seed for the direct round.
func vmherdRound(ctx context.Context, cl *client, tb *timed, name, img, seedDir string) (map[string]float64, map[string]float64, string, string, error) {
	t := map[string]float64{}
	bt := map[string]float64{}
	n := 0
	run := func(action string, data []byte) (*api.Event, error) {
		n++
		id := name + "-" + strconv.Itoa(n)
		if data == nil {
			data = body(name, action, id)
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
		sent, o, err := cl.doBody(cctx, name, action, id, data)
		if err != nil {
			return nil, err
		}
		if !o.ok() {
			return nil, fmt.Errorf("%s: %s: %s", action, o.Type, o.Reason)
		}
		t[action] = ms(o.At.Sub(sent))
		bt[action] = ms(tb.Last(action))
		return events.Decode(o.Data)
	}
	prep := fmt.Sprintf(`{"command_id":"%s-1","spec":{"name":%q,"backend":"qemu","image_path":%q,"vcpus":1,"memory_mb":128,"network":{"type":"user"}}}`,
		name, name, img)
	ev, err := run("prepare", []byte(prep))
	if err != nil {
		return nil, nil, "", "", err
	}
	if ev == nil || ev.Handle == nil || ev.Handle.WorkDir == "" {
		return nil, nil, "", "", errors.New("prepared event without a work dir")
	}
	seed := filepath.Join(seedDir, name+".iso")
	if err := os.MkdirAll(seedDir, 0o755); err != nil {
		return nil, nil, "", "", err
	}
	if err := copyFile(filepath.Join(ev.Handle.WorkDir, "seed.iso"), seed); err != nil {
		return nil, nil, "", "", fmt.Errorf("copying the seed: %w", err)
	}
	ev, err = run("start", nil)
	if err != nil {
		return nil, nil, "", "", err
	}
	accel := qemuData(*ev.Handle).Accel
	t0 := time.Now()
	if err := waitConsole(ctx, qemuData(*ev.Handle).SerialLog, guestimage.ReadyMarker, 5*time.Minute); err != nil {
		return nil, nil, "", "", err
	}
	t["boot"] = ms(time.Since(t0))
	for _, a := range []string{"suspend", "resume", "stop", "destroy"} {
		if _, err := run(a, nil); err != nil {
			return nil, nil, "", "", err
		}
	}
	return t, bt, accel, seed, nil
}

// directRound does what the QEMU backend does for one VM, by hand: a
// qcow2 overlay, QEMU launched daemonized with the backend's command line
// shape, QMP query-status until running (start), QMP stop and cont with
// query-status until paused/running (suspend, resume), system_powerdown
// and wait for the process to end (stop), removing the files (destroy).
func directRound(ctx context.Context, img, seed, dir, accel string) (map[string]float64, error) {
	t := map[string]float64{}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	disk := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", img, disk).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("qemu-img create: %v: %s", err, out)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	qmpSock, pidFile, consoleLog := filepath.Join(dir, "qmp.sock"), filepath.Join(dir, "qemu.pid"), filepath.Join(dir, "console.log")
	cpu := "max"
	if accel == qemu.AccelKVM {
		cpu = "host"
	}
	if accel == "" {
		accel = qemu.AccelTCG
	}
	args := []string{
		"-name", "guest=direct", "-machine", "q35", "-accel", accel, "-cpu", cpu, "-m", "128", "-smp", "1",
		"-nodefaults", "-no-user-config", "-daemonize", "-pidfile", pidFile,
		"-qmp", "unix:" + qmpSock + ",server=on,wait=off",
		"-chardev", "socket,id=serial0,path=" + filepath.Join(dir, "serial.sock") + ",server=on,wait=off,logfile=" + consoleLog + ",logappend=on",
		"-serial", "chardev:serial0",
		"-display", "none", "-vga", "std", "-vnc", "unix:" + filepath.Join(dir, "vnc.sock"), // as the backend: never on TCP
		"-drive", "file=" + disk + ",if=virtio,format=qcow2,discard=unmap",
		"-drive", "file=" + seed + ",media=cdrom,if=ide,format=raw,readonly=on",
		"-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:" + strconv.Itoa(port) + "-:22",
		"-device", "virtio-net-pci,netdev=n0,mac=02:00:00:be:9c:01",
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()

	t0 := time.Now()
	if out, err := exec.CommandContext(cctx, "qemu-system-x86_64", args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("launching QEMU: %v: %s", err, out)
	}
	pid := readPid(pidFile)
	if pid == 0 {
		return nil, errors.New("QEMU wrote no pidfile")
	}
	defer func() { _ = syscall.Kill(pid, syscall.SIGKILL) }()
	q, err := dialQMP(cctx, qmpSock)
	if err != nil {
		return nil, err
	}
	defer q.close()
	if err := q.waitStatus(cctx, "running"); err != nil {
		return nil, err
	}
	t["start"] = ms(time.Since(t0))

	if err := waitConsole(cctx, consoleLog, guestimage.ReadyMarker, 5*time.Minute); err != nil {
		return nil, err
	}
	for _, s := range []struct{ op, cmd, want string }{{"suspend", "stop", "paused"}, {"resume", "cont", "running"}} {
		t0 = time.Now()
		if _, err := q.exec(s.cmd); err != nil {
			return nil, err
		}
		if err := q.waitStatus(cctx, s.want); err != nil {
			return nil, err
		}
		t[s.op] = ms(time.Since(t0))
	}

	t0 = time.Now()
	if _, err := q.exec("system_powerdown"); err != nil {
		return nil, err
	}
	for alive(pid) {
		if cctx.Err() != nil {
			return nil, errors.New("the guest did not power off after system_powerdown")
		}
		time.Sleep(time.Millisecond)
	}
	t["stop"] = ms(time.Since(t0))

	t0 = time.Now()
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	t["destroy"] = ms(time.Since(t0))
	return t, nil
}

// waitConsole polls a console log until it shows want.
func waitConsole(ctx context.Context, path, want string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		if b, err := os.ReadFile(path); err == nil && strings.Contains(string(b), want) {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("console %s did not show %q within %s", path, want, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// alive reports whether pid is a live process. The daemonized QEMU is not
// this process's child: once it exits it stays a zombie until init reaps
// it, which counts as gone.
func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z' && s[i+2] != 'X'
	}
	return true
}

func readPid(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// warmFile reads a file once so neither side of a comparison pays for the
// first read from disk.
func warmFile(path string) {
	if f, err := os.Open(path); err == nil {
		_, _ = io.Copy(io.Discard, f)
		f.Close()
	}
}

// libvirtNote says whether libvirt could be compared, and why not.
func libvirtNote() string {
	if _, err := exec.LookPath("virsh"); err != nil {
		return "not compared: virsh is not installed (libvirt is optional; the benchmark does not install it)"
	}
	return "not compared: virsh is installed but a libvirt comparison is not implemented"
}

// qemuData is the QEMU backend's data of h (none when it does not decode:
// the paths it names are then empty, and waiting on them fails).
func qemuData(h api.VmHandle) qemu.HandleData {
	d, _ := qemu.DataOf(h)
	return d
}

package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmherd/vmherd/api"
)

// errForwardBusy: QEMU could not bind the SSH forward port.
var errForwardBusy = errors.New("the SSH forward port is in use")

// Start launches the VM's QEMU, or returns the current handle if it runs.
func (b *Backend) Start(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	out, err := b.start(ctx, h)
	if err != nil {
		return h, fmt.Errorf("starting vm %s: %w", h.Name, err)
	}
	return out, nil
}

func (b *Backend) start(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	r, unlock, err := b.lockLoad(ctx, h)
	if err != nil {
		return h, err
	}
	defer unlock()
	if pid := b.livePID(r); pid != 0 {
		// Already running: idempotent. Never touch a live VM's sockets.
		if r.Handle.PID != pid {
			r.Handle.PID = pid
			_ = r.save()
		}
		b.setOwned(r.Handle)
		return r.Handle.Clone(), nil
	}
	removeRuntime(r)
	// The chain again: an image root's files may have changed since the
	// prepare, and QEMU opens only what is checked now.
	if err := b.recheckChain(ctx, r); err != nil {
		return h, err
	}

	spec := r.Handle.Spec
	accel, why := b.accelFor(spec), "requested"
	if accel == AccelAuto {
		accel, why = detectAccel(b.opts.procRoot, b.opts.sysRoot, b.opts.devKVM)
	}
	b.log.Info("starting vm", "vm", r.Handle.Name, "id", r.Handle.ID, "accel", accel, "accel_reason", why)

	createdTap := false
	if spec.Network.Type == api.NetworkTap {
		if createdTap, err = b.ensureTap(ctx, r.Handle.TapDevice, spec.Network.Bridge); err != nil {
			return h, err
		}
	}
	fail := func(err error) (api.VmHandle, error) {
		if pid := readPidfile(r.path(pidFile)); pid != 0 && b.ifOurs(r, pid) != 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			b.waitGone(wctx, r, pid)
			cancel()
		}
		removeRuntime(r)
		if createdTap {
			_ = b.deleteTap(context.WithoutCancel(ctx), r.Handle.TapDevice)
		}
		return h, err
	}

	for attempt := 0; ; attempt++ {
		if spec.Network.Type == api.NetworkUser && (r.Handle.SSHPort == 0 || !b.portFree(r.Handle.SSHPort)) {
			if err := b.newPort(r); err != nil {
				return fail(err)
			}
		}
		err = b.launch(ctx, r, accel)
		if errors.Is(err, errForwardBusy) && attempt < 4 {
			b.log.Warn("SSH forward port busy, retrying with another", "vm", r.Handle.Name, "port", r.Handle.SSHPort)
			removeRuntime(r)
			if err := b.newPort(r); err != nil {
				return fail(err)
			}
			continue
		}
		break
	}
	if err != nil {
		return fail(err)
	}
	pid := readPidfile(r.path(pidFile))
	if pid == 0 {
		return fail(fmt.Errorf("QEMU did not write its pidfile %s%s", r.path(pidFile), b.diagnostics(r)))
	}

	var vnc string
	qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err = withQMP(qctx, r.Handle.QMPSocket, func(m *monitor) (err error) {
		vnc, err = m.started(qctx, accel, 200*time.Millisecond)
		return err
	})
	if err != nil {
		if b.ifOurs(r, pid) == 0 {
			return fail(fmt.Errorf("QEMU (pid %d) exited right after starting: %w%s", pid, err, b.diagnostics(r)))
		}
		return fail(fmt.Errorf("%w%s", err, b.diagnostics(r)))
	}

	if err := os.Chmod(r.path(vncSock), 0o600); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fail(fmt.Errorf("making the VNC socket private: %w", err))
	}
	r.Handle.PID = pid
	r.Handle.Accel = accel
	r.Handle.VNC = vnc
	r.Handle.StartedAt = time.Now().UTC()
	if r.Handle.Extra == nil {
		r.Handle.Extra = map[string]string{}
	}
	r.Handle.Extra[ExtraAccelWhy] = why
	delete(r.Handle.Extra, ExtraStopPath)
	if err := r.save(); err != nil {
		return fail(fmt.Errorf("saving %s: %w", r.path(recordFile), err))
	}
	b.setOwned(r.Handle)
	b.log.Info("started vm", "vm", r.Handle.Name, "id", r.Handle.ID, "pid", pid, "accel", accel, "vnc", vnc, "ssh_port", r.Handle.SSHPort)
	return r.Handle.Clone(), nil
}

// newPort picks another forwarded SSH port and records it.
func (b *Backend) newPort(r *record) error {
	b.allocMu.Lock()
	defer b.allocMu.Unlock()
	avoid := map[int]bool{r.Handle.SSHPort: true}
	for _, o := range b.allRecords(r.Handle.Name) {
		avoid[o.Handle.SSHPort] = true
	}
	p, err := freePort(avoid)
	if err != nil {
		return fmt.Errorf("picking the SSH forward port: %w", err)
	}
	r.Handle.SSHPort = p
	return r.save()
}

// launch runs QEMU with -daemonize (and extra arguments after the VM's
// own) and waits for the parent to exit, which it does once the daemon
// has initialised (or failed to).
func (b *Backend) launch(ctx context.Context, r *record, accel string, extra ...string) error {
	args := append(qemuArgs(r, accel), extra...)
	argv := append(append([]string{}, b.opts.Wrapper...), b.opts.QEMUBinary)
	argv = append(argv, args...)
	stderr, err := os.OpenFile(r.path(stderrFile), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer stderr.Close()
	fmt.Fprintf(stderr, "# %s %s\n", time.Now().UTC().Format(time.RFC3339), strings.Join(argv, " "))
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	// QEMU's daemon keeps these until it has initialised, so errors during
	// start land in the file; afterwards it points them at /dev/null.
	cmd.Stdout, cmd.Stderr = stderr, stderr
	cmd.WaitDelay = 5 * time.Second
	b.log.Debug("running qemu", "vm", r.Handle.Name, "argv", argv)
	if err := cmd.Run(); err != nil {
		msg := tail(r.path(stderrFile), 2048)
		if strings.Contains(msg, "Could not set up host forwarding rule") {
			return fmt.Errorf("%w: %s", errForwardBusy, lastLines(msg, 3))
		}
		return fmt.Errorf("QEMU failed to start (%w)%s", err, b.diagnostics(r))
	}
	return nil
}

// diagnostics is the tail of QEMU's stderr and of the console log, to
// append to a start error.
func (b *Backend) diagnostics(r *record) string {
	var s strings.Builder
	if t := lastLines(tail(r.path(stderrFile), 4096), 10); t != "" {
		s.WriteString("\nqemu stderr (" + r.path(stderrFile) + "):\n" + t)
	}
	if t := lastLines(tail(r.path(consoleLog), 4096), 10); t != "" {
		s.WriteString("\nconsole log (" + r.path(consoleLog) + "):\n" + t)
	}
	return s.String()
}

func lastLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	var keep []string
	for _, l := range lines {
		if strings.HasPrefix(l, "# ") { // our own argv line
			continue
		}
		keep = append(keep, l)
	}
	if len(keep) > n {
		keep = keep[len(keep)-n:]
	}
	return strings.TrimSpace(strings.Join(keep, "\n"))
}

// qemuArgs is QEMU's command line for r (without the binary).
func qemuArgs(r *record, accel string) []string {
	h := r.Handle
	spec := h.Spec
	cpu := "max"
	if accel == AccelKVM {
		cpu = "host"
	}
	a := []string{
		"-name", "guest=" + qopt(h.Name),
		"-machine", "q35",
		"-accel", accel,
		"-cpu", cpu,
		"-m", strconv.Itoa(spec.MemoryMB),
		"-smp", strconv.Itoa(spec.Vcpus),
		"-nodefaults", "-no-user-config",
		"-daemonize", "-pidfile", r.path(pidFile),
		"-qmp", "unix:" + qopt(h.QMPSocket) + ",server=on,wait=off",
		"-chardev", "socket,id=serial0,path=" + qopt(h.SerialSock) + ",server=on,wait=off,logfile=" + qopt(h.SerialLog) + ",logappend=on",
		"-serial", "chardev:serial0",
		// The display on a unix socket in the 0700 work dir (made 0600
		// once QEMU runs), never on TCP: QEMU's VNC server would accept
		// security type None from any local user (issue #26).
		"-display", "none", "-vga", "std", "-vnc", "unix:" + qopt(r.path(vncSock)),
	}
	a = append(a, diskArgs(r)...)
	a = append(a, "-drive", "file="+qopt(r.path(seedFile))+",media=cdrom,if=ide,format=raw,readonly=on")
	if spec.UEFI {
		a = append(a,
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+qopt(h.Extra[ExtraOVMFCode]),
			"-drive", "if=pflash,format=raw,unit=1,file="+qopt(h.Extra[ExtraOVMFVars]))
	}
	switch spec.Network.Type {
	case api.NetworkUser:
		a = append(a,
			"-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:"+strconv.Itoa(h.SSHPort)+"-:22",
			"-device", "virtio-net-pci,netdev=n0,mac="+h.MAC)
	case api.NetworkTap:
		a = append(a,
			"-netdev", "tap,id=n0,ifname="+h.TapDevice+",script=no,downscript=no",
			"-device", "virtio-net-pci,netdev=n0,mac="+h.MAC)
	default:
		a = append(a, "-nic", "none")
	}
	return a
}

// qopt escapes a value for a QEMU option list (commas are doubled).
func qopt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// recheckChain inspects the base image's chain again, its formats pinned
// as recorded, and records what it found.
func (b *Backend) recheckChain(ctx context.Context, r *record) error {
	base, format := r.Handle.Spec.ImagePath, r.Handle.Extra[ExtraBaseFmt]
	if len(r.Chain) > 0 {
		base, format = r.Chain[0].Path, r.Chain[0].Format
	}
	chain, err := b.inspectChain(ctx, base, format)
	if err != nil {
		return err
	}
	// A VM prepared before work dirs were private is made so now.
	for name, mode := range map[string]os.FileMode{"": 0o700, diskFile: 0o600, seedFile: 0o600} {
		if err := os.Chmod(r.path(name), mode); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	r.Chain = chain
	return r.save()
}

// backingFormats are the formats that take a backing file.
var backingFormats = map[string]bool{"qcow2": true, "qed": true, "vmdk": true}

// diskArgs name every layer of the disk to QEMU with its format
// (-blockdev), the overlay on top, so QEMU opens no backing file the
// chain check did not see and never guesses a format.
func diskArgs(r *record) []string {
	var a []string
	node := func(o map[string]any) {
		b, _ := json.Marshal(o)
		a = append(a, "-blockdev", string(b))
	}
	below := any(nil)
	for i := len(r.Chain) - 1; i >= 0; i-- {
		l := r.Chain[i]
		proto := "file"
		if st, err := os.Stat(l.Path); err == nil && st.Mode()&fs.ModeDevice != 0 {
			proto = "host_device"
		}
		name := "base" + strconv.Itoa(i)
		o := map[string]any{"node-name": name, "driver": l.Format, "read-only": true,
			"file": map[string]any{"driver": proto, "filename": l.Path, "read-only": true}}
		if backingFormats[l.Format] {
			o["backing"] = below
		}
		node(o)
		below = name
	}
	node(map[string]any{"node-name": "disk", "driver": "qcow2", "backing": below, "discard": "unmap",
		"file": map[string]any{"driver": "file", "filename": r.path(diskFile), "discard": "unmap"}})
	return append(a, "-device", "virtio-blk-pci,drive=disk")
}

// started checks a QEMU just launched: it must report running (under KVM
// it is asked again a few times, every settle: a KVM that cannot run the
// guest shows internal-error once the vCPUs have run for a moment), and
// returns where its VNC server listens.
func (m *monitor) started(ctx context.Context, accel string, settle time.Duration) (string, error) {
	st, err := m.status(ctx)
	if err != nil {
		return "", err
	}
	for i := 0; accel == AccelKVM && i < 5 && st.Status == "running"; i++ {
		if err := sleepCtx(ctx, settle); err != nil {
			return "", err
		}
		if st, err = m.status(ctx); err != nil {
			return "", err
		}
	}
	if st.Status != "running" {
		hint := ""
		if accel == AccelKVM {
			hint = "; KVM cannot run this guest on this host: set accel tcg"
		}
		return "", fmt.Errorf("QEMU reports status %q instead of running (accel %s)%s", st.Status, accel, hint)
	}
	return m.vnc(ctx)
}

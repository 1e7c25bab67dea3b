package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

// Stop asks the guest to power off (ACPI), re-asks half way through the
// timeout, then sends QEMU SIGTERM and, if that is not enough, SIGKILL. It
// returns once the process is gone, with PID 0 and Extra["stop_path"] set to
// how it ended (acpi, sigterm, sigkill, none). Stopping a stopped VM is a
// no-op.
func (b *Backend) Stop(ctx context.Context, h api.VmHandle, timeout time.Duration) (api.VmHandle, error) {
	r, unlock, err := b.lockLoad(ctx, h)
	if err != nil {
		return h, fmt.Errorf("stopping vm %s: %w", h.Name, err)
	}
	defer unlock()
	path, err := b.stop(ctx, r, timeout)
	if err != nil {
		return r.Handle.Clone(), fmt.Errorf("stopping vm %s: %w", h.Name, err)
	}
	out, _ := full(r.Handle.Clone()) // a copy: the path goes in the returned handle only
	if out.Extra == nil {
		out.Extra = map[string]string{}
	}
	out.Extra[ExtraStopPath] = path
	return out.Clone(), nil
}

// stop ends r's QEMU; called with the VM's lock held. On success r is
// saved with PID 0 and the runtime files and tap device are gone.
func (b *Backend) stop(ctx context.Context, r *record, timeout time.Duration) (string, error) {
	name := r.Handle.Name
	pid := b.livePID(r)
	path := StopPathNone
	if pid != 0 {
		b.setStopping(name, true)
		defer b.setStopping(name, false)
		var err error
		path, err = b.terminate(ctx, r, pid, timeout)
		if err != nil {
			return "", err
		}
		b.log.Info("stopped vm", "vm", name, "id", r.Handle.ID, "pid", pid, "stop_path", path)
	}
	b.disown(name)
	removeRuntime(r)
	if r.Handle.TapDevice != "" {
		if err := b.deleteTap(ctx, r.Handle.TapDevice); err != nil {
			return "", err
		}
	}
	if r.Handle.PID != 0 {
		r.Handle.PID = 0
		if err := r.save(); err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", err
		}
	}
	return path, nil
}

// powerdown presses the ACPI power button (system_powerdown), letting a
// paused guest run first: a paused guest cannot see the button.
func (m *monitor) powerdown(ctx context.Context) error {
	if st, err := m.status(ctx); err == nil && st.Status == "paused" {
		if err := m.run(ctx, "cont", nil, nil); err != nil {
			return err
		}
	}
	return m.run(ctx, "system_powerdown", nil, nil)
}

// terminate: ACPI power button, then SIGTERM, then SIGKILL. The graceful
// part gets timeout, shortened so the forced part still fits in ctx.
func (b *Backend) terminate(ctx context.Context, r *record, pid int, timeout time.Duration) (string, error) {
	name := r.Handle.Name
	graceEnd := time.Now().Add(timeout)
	if dl, ok := ctx.Deadline(); ok {
		if latest := dl.Add(-b.opts.TermTimeout - time.Second); latest.Before(graceEnd) {
			graceEnd = latest
		}
	}
	if time.Until(graceEnd) > 0 {
		powerdown := func() {
			qctx, cancel := context.WithTimeout(ctx, min(2*time.Second, time.Until(graceEnd)))
			defer cancel()
			err := withQMP(qctx, r.Handle.QMPSocket, func(m *monitor) error { return m.powerdown(qctx) })
			if err != nil && b.ifOurs(r, pid) != 0 {
				b.log.Warn("ACPI powerdown request failed", "vm", name, "err", err)
			}
		}
		powerdown()
		half := time.Now().Add(time.Until(graceEnd) / 2)
		hctx, cancel := context.WithDeadline(ctx, half)
		gone := b.waitGone(hctx, r, pid)
		cancel()
		if !gone && time.Until(graceEnd) > 0 {
			b.log.Info("guest still running half way through the stop timeout, asking again", "vm", name)
			powerdown()
			gctx, cancel := context.WithDeadline(ctx, graceEnd)
			gone = b.waitGone(gctx, r, pid)
			cancel()
		}
		if gone {
			return StopPathACPI, nil
		}
	}

	// Forced: these must finish even if ctx is about to end, or a VM
	// would be left half-stopped.
	fctx := context.WithoutCancel(ctx)
	b.log.Warn("guest did not power off in time, sending SIGTERM", "vm", name, "pid", pid, "timeout", timeout)
	if err := b.signal(r, pid, syscall.SIGTERM); err != nil {
		return "", fmt.Errorf("SIGTERM to QEMU pid %d: %w", pid, err)
	}
	tctx, cancel := context.WithTimeout(fctx, b.opts.TermTimeout)
	gone := b.waitGone(tctx, r, pid)
	cancel()
	if gone {
		return StopPathTerm, nil
	}
	b.log.Warn("QEMU ignored SIGTERM, sending SIGKILL", "vm", name, "pid", pid)
	if err := b.signal(r, pid, syscall.SIGKILL); err != nil {
		return "", fmt.Errorf("SIGKILL to QEMU pid %d: %w", pid, err)
	}
	kctx, cancel := context.WithTimeout(fctx, 10*time.Second)
	gone = b.waitGone(kctx, r, pid)
	cancel()
	if !gone {
		return "", fmt.Errorf("QEMU pid %d survived SIGKILL for 10s: %w", pid, backends.ErrNotRunning)
	}
	return StopPathKill, nil
}

// Destroy stops the VM with a short timeout and removes its work dir and
// tap device. Destroying an unknown VM (or an older incarnation) is a no-op.
func (b *Backend) Destroy(ctx context.Context, h api.VmHandle) error {
	wd, err := b.workDir(h.Name)
	if err != nil {
		return fmt.Errorf("destroying vm %s: %w", h.Name, err)
	}
	unlock, err := b.lockCtx(ctx, h.Name)
	if err != nil {
		return fmt.Errorf("destroying vm %s: %w", h.Name, err)
	}
	defer unlock()
	r, err := readRecord(wd)
	switch {
	case errors.Is(err, os.ErrNotExist):
		// Never prepared, already destroyed, or a Prepare that died half
		// way (no vm.json yet): remove what there is.
		if err := os.RemoveAll(wd); err != nil {
			return fmt.Errorf("destroying vm %s: %w", h.Name, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("destroying vm %s: %w", h.Name, err)
	case h.ID != "" && r.Handle.ID != h.ID:
		b.log.Info("destroy of an older incarnation ignored", "vm", h.Name, "id", h.ID, "current", r.Handle.ID)
		return nil
	}
	r.Handle.WorkDir = wd
	if _, err := b.stop(ctx, r, b.opts.DestroyStopTimeout); err != nil {
		return fmt.Errorf("destroying vm %s: %w", h.Name, err)
	}
	if err := os.RemoveAll(wd); err != nil {
		return fmt.Errorf("destroying vm %s: removing %s: %w", h.Name, wd, err)
	}
	b.log.Info("destroyed vm", "vm", h.Name, "id", r.Handle.ID)
	return nil
}

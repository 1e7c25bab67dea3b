package qemu

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

// mapStatus turns a QMP run state into a VmState.
func mapStatus(s string) api.VmState {
	switch s {
	case "running":
		return api.StateRunning
	case "paused", "suspended", "prelaunch":
		return api.StateSuspended
	case "shutdown":
		return api.StateStopped
	case "guest-panicked", "internal-error", "io-error":
		return api.StateFailed
	default:
		// debug, inmigrate, postmigrate, finish-migrate, restore-vm,
		// save-vm, watchdog, colo: transient; the VM exists and runs.
		return api.StateRunning
	}
}

// State: prepared (never started), running/suspended/stopped/failed as
// QEMU reports it, stopped when its process is gone. ErrNotFound without a
// work dir.
func (b *Backend) State(ctx context.Context, h api.VmHandle) (api.VmState, error) {
	r, err := b.load(h)
	if err != nil {
		return "", fmt.Errorf("state of vm %s: %w", h.Name, err)
	}
	st, _, err := b.state(ctx, r)
	if err != nil {
		return "", fmt.Errorf("state of vm %s: %w", h.Name, err)
	}
	return st, nil
}

// state returns r's state and the PID of its live QEMU (0 if none).
func (b *Backend) state(ctx context.Context, r *record) (api.VmState, int, error) {
	pid := b.livePID(r)
	if pid == 0 {
		if r.Handle.StartedAt.IsZero() {
			return api.StatePrepared, 0, nil
		}
		return api.StateStopped, 0, nil
	}
	var st qmpStatus
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	err := withQMP(qctx, r.Handle.QMPSocket, func(m *monitor) error {
		var err error
		st, err = m.status(qctx)
		return err
	})
	if err != nil {
		if b.ifOurs(r, pid) == 0 { // it ended while we asked
			return api.StateStopped, 0, nil
		}
		return "", pid, err
	}
	return mapStatus(st.Status), pid, nil
}

// Suspend pauses the vCPUs (QMP stop) and confirms QEMU reports paused.
func (b *Backend) Suspend(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	out, err := b.pauseResume(ctx, h, "stop", "paused")
	if err != nil {
		return h, fmt.Errorf("suspending vm %s: %w", h.Name, err)
	}
	return out, nil
}

// Resume continues the vCPUs (QMP cont) and confirms QEMU reports running.
func (b *Backend) Resume(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	out, err := b.pauseResume(ctx, h, "cont", "running")
	if err != nil {
		return h, fmt.Errorf("resuming vm %s: %w", h.Name, err)
	}
	return out, nil
}

func (b *Backend) pauseResume(ctx context.Context, h api.VmHandle, cmd, want string) (api.VmHandle, error) {
	r, unlock, err := b.lockLoad(ctx, h)
	if err != nil {
		return h, err
	}
	defer unlock()
	pid := b.livePID(r)
	if pid == 0 {
		return h, fmt.Errorf("its QEMU is not running; start it first: %w", backends.ErrNotRunning)
	}
	err = withQMP(ctx, r.Handle.QMPSocket, func(m *monitor) error { return m.toStatus(ctx, cmd, want) })
	if err != nil {
		return h, err
	}
	r.Handle.PID = pid
	return r.Handle.Clone(), nil
}

// toStatus runs cmd (stop or cont) unless QEMU already reports status
// want, then polls query-status until it does (or ctx ends).
func (m *monitor) toStatus(ctx context.Context, cmd, want string) error {
	st, err := m.status(ctx)
	if err != nil {
		return err
	}
	if st.Status == want {
		return nil // already there: idempotent
	}
	if err := m.run(ctx, cmd, nil, nil); err != nil {
		return err
	}
	for {
		if st, err = m.status(ctx); err != nil {
			return err
		}
		if st.Status == want {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("QEMU reports %q, not %q: %w", st.Status, want, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Watch reports QEMU processes this Backend started or adopted that end
// without a Stop or Destroy: a crash, a kill, a guest poweroff. Each end is
// reported once per Watch call, with the ID and PID of the incarnation that
// ended. The channel closes when ctx ends.
func (b *Backend) Watch(ctx context.Context) <-chan backends.Exit {
	out := make(chan backends.Exit)
	go func() {
		defer close(out)
		reported := map[string]bool{} // "<id>/<pid>"
		t := time.NewTicker(b.opts.WatchInterval)
		defer t.Stop()
		for {
			b.rotateLogs()
			for _, e := range b.exited(reported) {
				select {
				case out <- e:
				case <-ctx.Done():
					return
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return out
}

// exited returns the owned VMs whose QEMU ended since the last poll.
func (b *Backend) exited(reported map[string]bool) []backends.Exit {
	b.mu.Lock()
	var cands []handle
	for _, o := range b.owned {
		if o.stopping || o.h.PID == 0 || reported[o.h.ID+"/"+fmt.Sprint(o.h.PID)] {
			continue
		}
		cands = append(cands, o.h)
	}
	b.mu.Unlock()
	var out []backends.Exit
	for _, h := range cands {
		r := &record{Handle: h}
		if b.ifOurs(r, h.PID) != 0 {
			continue
		}
		// Re-check under the lock: a Stop that began meanwhile owns the end.
		b.mu.Lock()
		o, ok := b.owned[h.Name]
		still := ok && !o.stopping && o.h.ID == h.ID && o.h.PID == h.PID
		b.mu.Unlock()
		if !still {
			continue
		}
		key := h.ID + "/" + fmt.Sprint(h.PID)
		reported[key] = true
		reason := fmt.Sprintf("qemu (pid %d) exited without a stop command (guest poweroff, crash or kill)", h.PID)
		if t := printable(lastLines(tail(r.path(consoleLog), 1024), 1)); t != "" {
			reason += "; last console line: " + t
		}
		b.log.Warn("vm exited", "vm", h.Name, "id", h.ID, "pid", h.PID, "reason", reason)
		out = append(out, backends.Exit{Handle: h.Clone(), Reason: reason})
	}
	return out
}

// Adopt takes back a VM left by an earlier worker process: it reads the
// record, checks the pidfile's process is this VM's QEMU, reconnects QMP
// and returns the handle with the real state. A VM whose QEMU is gone
// reads stopped (or prepared, if it never ran).
func (b *Backend) Adopt(ctx context.Context, h api.VmHandle, recorded api.VmState) (api.VmHandle, api.VmState, error) {
	if _, err := b.workDir(h.Name); err != nil {
		return h, "", fmt.Errorf("adopting vm %s: %w", h.Name, err)
	}
	unlock, err := b.lockCtx(ctx, h.Name)
	if err != nil {
		return h, "", fmt.Errorf("adopting vm %s: %w", h.Name, err)
	}
	defer unlock()
	r, err := b.load(h)
	if err != nil {
		return h, "", fmt.Errorf("adopting vm %s (recorded %s): %w", h.Name, recorded, err)
	}
	st, pid, err := b.state(ctx, r)
	if err != nil {
		return h, "", fmt.Errorf("adopting vm %s: %w", h.Name, err)
	}
	if pid == 0 {
		r.Handle.PID = 0
		b.disown(h.Name)
		b.log.Info("adopted vm with no running QEMU", "vm", h.Name, "id", r.Handle.ID, "recorded", recorded, "state", st)
		return r.Handle.Clone(), st, nil
	}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_ = withQMP(qctx, r.Handle.QMPSocket, func(m *monitor) error {
		if v, err := m.vnc(qctx); err == nil {
			r.Handle.VNC = v
		}
		return nil
	})
	if r.Handle.PID != pid {
		r.Handle.PID = pid
		if err := r.save(); err != nil {
			return h, "", fmt.Errorf("adopting vm %s: %w", h.Name, err)
		}
	}
	b.setOwned(r.Handle)
	b.log.Info("adopted running vm", "vm", h.Name, "id", r.Handle.ID, "pid", pid, "recorded", recorded, "state", st)
	return r.Handle.Clone(), st, nil
}

// printable drops control characters (terminal escapes in console output).
func printable(s string) string {
	return strings.TrimSpace(strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, s))
}

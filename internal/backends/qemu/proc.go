package qemu

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// procState reads the state letter of /proc/<pid>/stat ("" if no such
// process). Z (zombie) and X (dead) mean the process has ended even though
// kill(pid, 0) still succeeds until its parent reaps it.
func procState(procRoot string, pid int) string {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return ""
	}
	// pid (comm) S ...: comm may hold spaces and parens; the state follows
	// the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return ""
	}
	return string(b[i+2])
}

// processAlive says whether pid is a live (not zombie) process.
func processAlive(procRoot string, pid int) bool {
	if pid <= 0 {
		return false
	}
	switch procState(procRoot, pid) {
	case "", "Z", "X", "x":
		return false
	}
	return true
}

// cmdlineHas says whether /proc/<pid>/cmdline has an argument containing s:
// our QEMU is the one whose command line names this VM's QMP socket.
func cmdlineHas(procRoot string, pid int, s string) bool {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return false
	}
	for _, arg := range bytes.Split(b, []byte{0}) {
		if bytes.Contains(arg, []byte(s)) {
			return true
		}
	}
	return false
}

// readPidfile returns the PID in a pidfile, 0 if there is none.
func readPidfile(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}

// livePID returns the PID of r's running QEMU, or 0: the pidfile's PID if
// that process is alive and its command line names r's QMP socket (a PID
// reused by another process does not count).
func (b *Backend) livePID(r *record) int {
	pid := readPidfile(r.path(pidFile))
	if pid == 0 {
		return 0
	}
	return b.ifOurs(r, pid)
}

// ifOurs returns pid if it is r's QEMU and alive, else 0.
func (b *Backend) ifOurs(r *record, pid int) int {
	if !processAlive(b.opts.procRoot, pid) || !cmdlineHas(b.opts.procRoot, pid, r.Handle.QMPSocket) {
		return 0
	}
	return pid
}

// waitGone polls until pid is no longer r's live QEMU or ctx ends. It polls
// every 5 ms (two small /proc reads): a stop is reported as soon as the
// guest is gone, not up to a poll interval later.
func (b *Backend) waitGone(ctx context.Context, r *record, pid int) bool {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if b.ifOurs(r, pid) == 0 {
			return true
		}
		select {
		case <-ctx.Done():
			return b.ifOurs(r, pid) == 0
		case <-t.C:
		}
	}
}

// signal sends sig to pid if it is still r's QEMU.
func (b *Backend) signal(r *record, pid int, sig syscall.Signal) error {
	if b.ifOurs(r, pid) == 0 {
		return nil
	}
	err := syscall.Kill(pid, sig)
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// removeRuntime deletes the files of a QEMU that no longer runs.
func removeRuntime(r *record) {
	for _, f := range []string{pidFile, qmpSock, serialSock, vncSock} {
		_ = os.Remove(r.path(f))
	}
}

// tail returns the last n bytes of a file, trimmed, for error messages.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := st.Size() - n
	if off < 0 {
		off = 0
	}
	buf := make([]byte, st.Size()-off)
	if _, err := f.ReadAt(buf, off); err != nil {
		return ""
	}
	return strings.TrimSpace(strings.ToValidUTF8(string(buf), "?"))
}

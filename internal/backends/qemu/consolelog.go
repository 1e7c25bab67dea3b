package qemu

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"syscall"
)

// The console log's bound, as libvirt's virtlogd keeps it: the live file
// up to DefaultLogMaxBytes, then rotated, with DefaultLogKeep older files.
const (
	DefaultLogMaxBytes = 2 << 20
	DefaultLogKeep     = 3
)

// rotateLogs rotates the console log of every running VM this Backend
// owns that has outgrown Options.LogMaxBytes. Called from Watch's poll.
func (b *Backend) rotateLogs() {
	b.mu.Lock()
	var logs []string
	for _, o := range b.owned {
		if o.h.PID != 0 && o.h.SerialLog != "" {
			logs = append(logs, o.h.SerialLog)
		}
	}
	b.mu.Unlock()
	for _, p := range logs {
		if dropped, err := rotateLog(p, b.opts.LogMaxBytes, b.opts.LogKeep); err != nil {
			b.log.Warn("rotating a console log", "path", p, "err", err)
		} else if dropped > 0 {
			b.log.Warn("a console log grew faster than it is rotated; dropped its oldest bytes", "path", p, "dropped", dropped)
		}
	}
}

// rotateLog keeps path, a console log QEMU appends to (logappend=on, so
// O_APPEND: its writes go to the end however long the file is), within
// bounds: once it is longer than limit, path.keep-1 … path.1 move up one
// (the oldest is dropped), path is copied to a new path.1 (0600) and
// truncated to nothing. QEMU keeps its file open, so this is a copy and
// truncate, as logrotate's copytruncate: what QEMU writes in the instant
// between the copy's end and the truncation is lost. A rotated file keeps
// at most 2 × limit bytes: a guest that wrote more than limit between two
// polls (Options.WatchInterval) loses the oldest of it (dropped says how
// much) and what it writes during the copy beyond that. So a VM's console output on disk is at most
// limit + keep × 2 × limit bytes plus what the guest writes between two
// polls; at the rates a serial console runs (55 KB/s under TCG) every
// rotated file is about limit bytes.
func rotateLog(path string, limit int64, keep int) (dropped int64, err error) {
	f, err := os.OpenFile(path, os.O_RDWR|noFollow, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.Size() <= limit {
		return 0, err
	}
	rotated := func(i int) string { return path + "." + strconv.Itoa(i) }
	_ = os.Remove(rotated(keep))
	for i := keep - 1; i >= 1; i-- {
		if err := os.Rename(rotated(i), rotated(i+1)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return 0, err
		}
	}
	out, err := os.OpenFile(rotated(1), os.O_WRONLY|os.O_CREATE|os.O_EXCL|noFollow, 0o600)
	if err != nil {
		return 0, fmt.Errorf("rotating %s: %w", path, err)
	}
	// Up to the current end (QEMU may be appending: read what is there
	// now), keeping the last 2 × limit bytes.
	size := st.Size()
	if cur, err := f.Seek(0, io.SeekEnd); err == nil {
		size = cur
	}
	from := max(size-2*limit, 0)
	n, cerr := io.Copy(out, io.NewSectionReader(f, from, size-from))
	// What QEMU appended while the section was copied, as long as the
	// rotated file stays within 2 × limit (past that the guest writes
	// faster than it is rotated, and the truncation drops the rest).
	for cerr == nil {
		var k int64
		end, _ := f.Seek(0, io.SeekEnd)
		end = min(end, from+2*limit)
		if end <= from+n {
			break
		}
		k, cerr = io.Copy(out, io.NewSectionReader(f, from+n, end-from-n))
		n += k
	}
	if err := out.Close(); err != nil && cerr == nil {
		cerr = err
	}
	if cerr != nil {
		return 0, fmt.Errorf("rotating %s: %w", path, cerr)
	}
	if err := f.Truncate(0); err != nil {
		return 0, fmt.Errorf("rotating %s: %w", path, err)
	}
	return from, nil
}

const noFollow = syscall.O_NOFOLLOW

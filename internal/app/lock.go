package app

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// LockFileName is the file in the data dir an engine holds locked for its
// whole life; it contains the holder's PID.
const LockFileName = "engine.lock"

// errLocked is what lockFile returns when another process holds the lock.
var errLocked = errors.New("locked by another process")

// DataDirLock is an engine's hold on its data dir.
type DataDirLock struct {
	Path string
	f    *os.File
}

// DataDirInUseError says another engine holds the data dir.
type DataDirInUseError struct {
	Dir, Path string
	PID       int // 0: unknown
}

func (e *DataDirInUseError) Error() string {
	holder := "pid " + strconv.Itoa(e.PID)
	if e.PID == 0 {
		holder = "an unknown pid"
	}
	return fmt.Sprintf("data dir %s is in use by another engine (%s holds %s); stop it or choose another --data-dir", e.Dir, holder, e.Path)
}

// LockDataDir takes dir's lock file, without waiting, and writes this
// process's PID into it. The lock is the kernel's (flock(2) where there is
// one), so it goes with the process however that ends: a lock file left by
// a dead engine does not block. Release it with Release.
func LockDataDir(dir string) (*DataDirLock, error) {
	p := filepath.Join(dir, LockFileName)
	// Go opens files close-on-exec, so child processes (hypervisors) do not
	// inherit the lock and keep it after the engine is gone.
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("data dir %s: opening lock file: %w (choose another with --data-dir)", dir, err)
	}
	if err := lockFile(f); err != nil {
		f.Close()
		if errors.Is(err, errLocked) {
			e := &DataDirInUseError{Dir: dir, Path: p, PID: readLockPID(p)}
			if abs, err := filepath.Abs(dir); err == nil {
				e.Dir, e.Path = abs, filepath.Join(abs, LockFileName)
			}
			return nil, e
		}
		return nil, fmt.Errorf("data dir %s: locking %s: %w", dir, p, err)
	}
	pid := []byte(strconv.Itoa(os.Getpid()) + "\n")
	if err := f.Truncate(0); err == nil {
		_, err = f.WriteAt(pid, 0)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("data dir %s: writing %s: %w", dir, p, err)
	}
	return &DataDirLock{Path: p, f: f}, nil
}

// Release empties the lock file and lets the lock go. The file itself
// stays: removing it could let two engines lock different files.
func (l *DataDirLock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	_ = l.f.Truncate(0)
	err := l.f.Close() // closing drops the lock
	l.f = nil
	return err
}

// readLockPID reads the holder's PID; the holder writes it just after
// locking, so an empty file is retried briefly.
func readLockPID(p string) int {
	for range 10 {
		b, err := os.ReadFile(p)
		if err != nil {
			return 0
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			return pid
		}
		time.Sleep(20 * time.Millisecond)
	}
	return 0
}

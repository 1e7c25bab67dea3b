package app

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestLockDataDirHeldAndReleased(t *testing.T) {
	dir := t.TempDir()
	l, err := LockDataDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, LockFileName)
	if b, _ := os.ReadFile(p); strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
		t.Errorf("lock file holds %q, want our pid %d", b, os.Getpid())
	}
	// flock belongs to the open file: a second take in this process fails too.
	_, err = LockDataDir(dir)
	var inUse *DataDirInUseError
	if !errors.As(err, &inUse) {
		t.Fatalf("second lock: got %v, want DataDirInUseError", err)
	}
	want := "data dir " + dir + " is in use by another engine (pid " + strconv.Itoa(os.Getpid()) +
		" holds " + p + "); stop it or choose another --data-dir"
	if err.Error() != want {
		t.Errorf("message\n got: %s\nwant: %s", err, want)
	}
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	l2, err := LockDataDir(dir)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	l2.Release()
}

// A lock file left behind with a dead process's PID does not block.
func TestLockDataDirStaleFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, LockFileName)
	if err := os.WriteFile(p, []byte("2147483646\nleftover junk that is longer\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := LockDataDir(dir)
	if err != nil {
		t.Fatalf("stale lock file blocked: %v", err)
	}
	defer l.Release()
	if b, _ := os.ReadFile(p); string(b) != strconv.Itoa(os.Getpid())+"\n" {
		t.Errorf("lock file holds %q, want our pid %d", b, os.Getpid())
	}
}

func TestDataDirInUseUnknownPID(t *testing.T) {
	e := &DataDirInUseError{Dir: "/x", Path: "/x/engine.lock"}
	want := "data dir /x is in use by another engine (an unknown pid holds /x/engine.lock); stop it or choose another --data-dir"
	if e.Error() != want {
		t.Errorf("got %s", e)
	}
}

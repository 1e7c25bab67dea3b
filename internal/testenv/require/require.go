// Package require holds what tests of every package share and what cannot
// live in internal/testenv, which imports the engine, the worker and the
// backends: skipping on (or, under scripts/test, failing for) a missing
// prerequisite, and finding the checkout. It imports only the standard
// library, so any package, including its internal tests and non-test
// helpers such as guestimage.EnsureForTest, can use it.
package require

import (
	"bufio"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// AllEnv is the environment variable that turns every missing
// prerequisite into a failure. scripts/test (and so CI, through .ci/run)
// sets it, after scripts/setup has installed everything.
const AllEnv = "VMHERD_REQUIRE_ALL"

// Require reports a missing prerequisite when ok is false: a failure when
// VMHERD_REQUIRE_ALL is set, else a skip with the reason.
func Require(t testing.TB, ok bool, why string) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv(AllEnv) != "" {
		t.Fatalf("%s (run scripts/setup to install it)", why)
	}
	t.Skipf("%s; run scripts/setup (or scripts/test) to run this test", why)
}

// Module is the module path whose go.mod RepoRoot looks for.
const Module = "github.com/vmherd/vmherd"

// RepoRoot is the vmherd checkout: the directory holding its go.mod. It is
// the nearest such directory at or above the working directory, else the
// one this package was compiled from (if its source is still there, as
// under go run and go test).
func RepoRoot() (string, error) {
	if dir, err := os.Getwd(); err == nil {
		for {
			if isRoot(dir) {
				return dir, nil
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		// file is <root>/internal/testenv/require/require.go.
		if dir := filepath.Join(filepath.Dir(file), "..", "..", ".."); isRoot(dir) {
			return filepath.Clean(dir), nil
		}
	}
	return "", errors.New("cannot find the vmherd checkout (a go.mod for " + Module + "): run this from inside it")
}

// isRoot reports whether dir holds the go.mod of vmherd.
func isRoot(dir string) bool {
	f, err := os.Open(filepath.Join(dir, "go.mod"))
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`) == Module
		}
	}
	return false
}

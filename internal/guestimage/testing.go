package guestimage

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// DefaultCacheDir is <repo>/.cache/guest, the repo being the module root
// that holds go.mod (found with "go env GOMOD", else by walking up from the
// working directory).
func DefaultCacheDir() (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache", "guest"), nil
}

func repoRoot() (string, error) {
	if out, err := exec.Command("go", "env", "GOMOD").Output(); err == nil {
		if p := strings.TrimSpace(string(out)); p != "" && p != os.DevNull {
			return filepath.Dir(p), nil
		}
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod found above the working directory")
		}
		dir = parent
	}
}

var (
	testOnce sync.Once
	testPath string
	testErr  error
)

// EnsureForTest builds (or finds cached) the guest image under
// <repo>/.cache/guest and returns its path. It skips the test, naming the
// Debian packages to install, when the build's inputs are missing; set
// VMHERD_REQUIRE_GUEST=1 (CI does) to fail instead.
func EnsureForTest(t testing.TB) string {
	t.Helper()
	testOnce.Do(func() {
		dir, err := DefaultCacheDir()
		if err != nil {
			testErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if _, err := (Options{}).inputs(); err != nil {
			testErr = &missingError{err}
			return
		}
		testPath, testErr = Build(ctx, dir)
	})
	var m *missingError
	if errors.As(testErr, &m) && os.Getenv("VMHERD_REQUIRE_GUEST") == "" && os.Getenv("VMHERD_REQUIRE_ALL") == "" && os.Getenv("CI") == "" {
		t.Skipf("guest image inputs missing: %v (apt-get install %s)", m.err, strings.Join(Packages, " "))
	}
	if testErr != nil {
		t.Fatalf("guest image: %v", testErr)
	}
	return testPath
}

type missingError struct{ err error }

func (e *missingError) Error() string { return e.err.Error() }
func (e *missingError) Unwrap() error { return e.err }

package guestimage

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/testenv/require"
)

// DefaultCacheDir is <repo>/.cache/guest, the repo being the vmherd
// checkout (require.RepoRoot: the go.mod at or above the working
// directory, else the source this was built from).
func DefaultCacheDir() (string, error) {
	root, err := require.RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache", "guest"), nil
}

var (
	testOnce sync.Once
	testPath string
	testErr  error
)

// EnsureForTest builds (or finds cached) the guest image under
// <repo>/.cache/guest and returns its path. When the build's inputs are
// missing it skips the test, naming the Debian packages to install, or
// fails under VMHERD_REQUIRE_ALL (require.Require).
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
	if errors.As(testErr, &m) {
		require.Require(t, false, missingInputs(m.err))
	}
	if testErr != nil {
		t.Fatalf("guest image: %v", testErr)
	}
	return testPath
}

// missingInputs is the reason a test gives when the build's inputs are
// missing (err says which).
func missingInputs(err error) string {
	return fmt.Sprintf("guest image inputs missing: %v (apt-get install %s)", err, strings.Join(Packages, " "))
}

type missingError struct{ err error }

func (e *missingError) Error() string { return e.err.Error() }
func (e *missingError) Unwrap() error { return e.err }

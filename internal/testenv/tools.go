package testenv

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/vmherd/vmherd/internal/testenv/require"
)

// Require reports a missing prerequisite: a failure when VMHERD_REQUIRE_ALL
// is set (scripts/test and CI install everything), else a skip with the
// reason. It is require.Require, for the tests that import testenv anyway.
func Require(t testing.TB, ok bool, why string) {
	t.Helper()
	require.Require(t, ok, why)
}

// Tool finds a program on PATH or in $GOPATH/bin.
func Tool(t testing.TB, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		out, _ := exec.Command("go", "env", "GOPATH").Output()
		gopath = string(out[:max(0, len(out)-1)])
	}
	p := filepath.Join(gopath, "bin", name)
	_, err := os.Stat(p)
	Require(t, err == nil, name+" is not installed")
	return p
}

// RepoRoot is the directory holding go.mod (require.RepoRoot).
func RepoRoot(t testing.TB) string {
	t.Helper()
	root, err := require.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Binaries builds cmd/engine, cmd/worker and cmd/vmctl once per test
// process and returns the directory holding them.
func Binaries(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "vmherd-bin-")
		if buildErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-race", "-o", buildDir+"/", "./cmd/engine", "./cmd/worker", "./cmd/vmctl")
		cmd.Dir = RepoRoot(t)
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = &buildError{out: string(out), err: err}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildDir
}

type buildError struct {
	out string
	err error
}

func (e *buildError) Error() string { return "building binaries: " + e.err.Error() + "\n" + e.out }

// FreePort returns a TCP port free on 127.0.0.1 right now.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Addr is 127.0.0.1:port.
func Addr(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }

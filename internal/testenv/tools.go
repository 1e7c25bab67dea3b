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

// A build of the three binaries, made once per test process.
type build struct {
	once sync.Once
	dir  string
	err  error
}

var raceBuild, plainBuild build

// Binaries builds cmd/engine, cmd/worker and cmd/vmctl with the race
// detector, once per test process, and returns the directory holding them.
func Binaries(t testing.TB) string {
	t.Helper()
	return raceBuild.get(t, "-race")
}

// PlainBinaries is Binaries without the race detector, for tests that run
// thousands of processes (the race detector's start-up and bookkeeping
// would be most of their cost); the race tests cover the same code.
func PlainBinaries(t testing.TB) string {
	t.Helper()
	return plainBuild.get(t)
}

func (b *build) get(t testing.TB, flags ...string) string {
	t.Helper()
	b.once.Do(func() {
		b.dir, b.err = os.MkdirTemp("", "vmherd-bin-")
		if b.err != nil {
			return
		}
		args := append(append([]string{"build"}, flags...), "-o", b.dir+"/", "./cmd/engine", "./cmd/worker", "./cmd/vmctl")
		cmd := exec.Command("go", args...)
		cmd.Dir = RepoRoot(t)
		out, err := cmd.CombinedOutput()
		if err != nil {
			b.err = &buildError{out: string(out), err: err}
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.dir
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

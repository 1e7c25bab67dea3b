package deploy_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/testenv/require"
)

// TestUnitsVerify runs systemd-analyze verify on deploy/systemd's units,
// with the binaries where the units expect them (/opt/vmherd/bin, bound
// in a mount namespace of the test's own).
func TestUnitsVerify(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	testenv.Require(t, err == nil, "systemd-analyze is not installed")
	testenv.Require(t, os.Geteuid() == 0, "binding /opt/vmherd needs root")
	_, err = exec.LookPath("unshare")
	testenv.Require(t, err == nil, "unshare is not installed")
	root, err := require.RepoRoot()
	must(t, err)
	bin := testenv.PlainBinaries(t)
	opt := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(opt, "bin"), 0o755))
	for _, b := range []string{"engine", "worker"} {
		must(t, os.Symlink(filepath.Join(bin, b), filepath.Join(opt, "bin", b)))
	}
	must(t, os.Symlink(testenv.Tool(t, "nats-server"), filepath.Join(opt, "bin", "nats-server")))
	if _, err := os.Stat("/opt/vmherd"); os.IsNotExist(err) {
		must(t, os.MkdirAll("/opt/vmherd", 0o755))
		t.Cleanup(func() { _ = os.Remove("/opt/vmherd") })
	}
	units, err := filepath.Glob(filepath.Join(root, "deploy", "systemd", "*.service"))
	must(t, err)
	if len(units) != 3 {
		t.Fatalf("deploy/systemd has %d units, want 3 (nats, engine, worker)", len(units))
	}
	script := "mount --bind \"$0\" /opt/vmherd && exec \"$1\" verify \"${@:2}\""
	out, err := exec.Command("unshare", append([]string{"--mount", "--propagation", "private", "bash", "-c", script, opt, sa}, units...)...).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "" {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

package deploy_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmherd/vmherd/internal/testenv"
)

// TestConfigFiles: `config --print` writes every key with its default, a
// file the daemon takes back as it is; the command line and VMHERD_*
// override the file; an unknown key or a bad value stops the daemon with
// exit 78, naming the file and the key.
func TestConfigFiles(t *testing.T) {
	bin := testenv.PlainBinaries(t)
	dir := t.TempDir()
	run := func(env []string, name string, args ...string) (string, int) {
		cmd := exec.Command(filepath.Join(bin, name), args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), ee.ExitCode()
		}
		must(t, err)
		return string(out), 0
	}
	for _, d := range []string{"engine", "worker"} {
		def, rc := run(nil, d, "config", "--print")
		if rc != 0 {
			t.Fatalf("%s config --print: exit %d\n%s", d, rc, def)
		}
		for _, k := range []string{"\ndata-dir = ", "\nnats-url = ", "\ncreds = ", "\ntls-ca = ", "\nlog-level = \"info\"\n", "\nmetrics-listen = ", "\nheartbeat = \"2s\"\n", "\nimage-dir = []\n"} {
			if !strings.Contains(def, k) {
				t.Errorf("%s config --print lacks %q", d, strings.TrimSpace(k))
			}
		}
		p := filepath.Join(dir, d+".toml")
		must(t, os.WriteFile(p, []byte(def), 0o644))
		back, rc := run(nil, d, "config", "--print", "--config", p)
		if rc != 0 || back != def {
			t.Errorf("%s: the printed defaults, read back, print differently (exit %d):\n%s", d, rc, back)
		}
	}

	p := filepath.Join(dir, "w.toml")
	must(t, os.WriteFile(p, []byte("host = \"from-file\"\nconcurrency = 7\nheartbeat = \"5s\"\n"), 0o644))
	out, _ := run([]string{"VMHERD_CONCURRENCY=9"}, "worker", "config", "--print", "--config", p)
	for _, want := range []string{"\nhost = \"from-file\"\n", "\nconcurrency = 9\n", "\nheartbeat = \"5s\"\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("file, then environment: want %q in\n%s", strings.TrimSpace(want), out)
		}
	}

	for _, tc := range []struct{ text, want string }{
		{"heartbaet = \"1s\"\n", `unknown key "heartbaet" (did you mean "heartbeat"?`},
		{"concurrency = \"many\"\n", `key "concurrency": the string "many", but it takes a whole number`},
		{"backends = [\"qemu\"]\n", `key "backends": a list, but it takes one string value`},
	} {
		must(t, os.WriteFile(p, []byte(tc.text), 0o644))
		out, rc := run(nil, "worker", "--config", p, "--nats-url", "nats://127.0.0.1:1")
		if rc != 78 || !strings.Contains(out, p+": "+tc.want) {
			t.Errorf("worker with %q: exit %d, want 78 naming %q:\n%s", tc.text, rc, tc.want, out)
		}
	}

	// As root, a configuration others may write is refused.
	if os.Geteuid() == 0 {
		must(t, os.WriteFile(p, []byte("host = \"h1\"\n"), 0o644))
		must(t, os.Chmod(p, 0o666))
		out, rc := run(nil, "worker", "--config", p, "--nats-url", "nats://127.0.0.1:1")
		if rc != 78 || !strings.Contains(out, p+" is writable by others") {
			t.Errorf("worker as root with a 0666 config: exit %d, want 78:\n%s", rc, out)
		}
	}
}

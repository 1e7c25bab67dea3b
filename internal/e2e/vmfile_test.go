package e2e_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/testenv"
)

const provisionVMFile = `// The seed's example shape, pointed at the test guest.
vm "prov1" {
    image-url "%URL%"
    backend "qemu"
    memory %MEM%
    cloud-init {
        hostname "prov1"
    }
    ssh {
        user "vm"
    }
    provision "shell" {
        inline "echo hello-from-inline > /tmp/inline.txt; echo inline-ran"
    }
    provision "file" {
        source "files/app.conf"
        destination "/tmp/app/app.conf"
    }
    provision "shell" {
        script "scripts/setup.sh"
    }
}
`

// vmctl up boots a VM from a VMFile (pulling its image-url into the
// worker's store) and provisions it over SSH through NATS with a key it
// generated, checking the host key the guest printed; vmctl ssh reads what
// was uploaded, with its mode; a changed definition is reported, not
// applied; a failing step is reported with its exit code and output;
// down --destroy removes the VM.
func TestVMFileUpProvision(t *testing.T) {
	testenv.Tool(t, "ssh")
	bin := testenv.Binaries(t)
	env, image, srv := imageStoreEnv(t)

	dir := t.TempDir()
	write := func(rel, content string, mode os.FileMode) {
		t.Helper()
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
	}
	vmfile := func(mem string) {
		write("VMFile.kdl", strings.NewReplacer("%URL%", srv.URL+"/"+filepath.Base(image), "%MEM%", mem).Replace(provisionVMFile), 0o644)
	}
	vmfile("256")
	write("files/app.conf", "listen 8080\n", 0o640)
	write("scripts/setup.sh", "echo script-ran-as-$(id -un)\ntouch /tmp/script-done\n", 0o755)

	vmctl := func(want int, args ...string) string {
		t.Helper()
		stdout, stderr, code := testenv.Run(t, 6*time.Minute, nil, filepath.Join(bin, "vmctl"), append([]string{"--server", env.URL}, args...)...)
		out := stdout + stderr
		if want >= 0 && code != want {
			t.Fatalf("vmctl %v: exit %d, want %d\n%s", args, code, want, out)
		}
		return out
	}
	f := filepath.Join(dir, "VMFile.kdl")
	out := vmctl(0, "up", "--file", f)
	for _, w := range []string{"ready", "step 1/3", "inline-ran", "step 2/3", "step 3/3", "script-ran-as-vm", "provisioned (3 steps)"} {
		if !strings.Contains(out, w) {
			t.Errorf("vmctl up output lacks %q:\n%s", w, out)
		}
	}
	// ssh (the system ssh through vmctl proxy, with the generated key and
	// the host key learned at first boot) reads what provisioning left.
	if got := vmctl(0, "ssh", "prov1", "--", "cat /tmp/app/app.conf; stat -c %a /tmp/app/app.conf; cat /tmp/inline.txt; ls /tmp/script-done"); !strings.Contains(got, "listen 8080\n640\nhello-from-inline\n/tmp/script-done") {
		t.Fatalf("vmctl ssh after provisioning:\n%s", got)
	}
	// status shows what the QEMU backend shows of its handle data (the
	// worker's state query): the forwarded port, the accelerator, the display.
	if got := vmctl(0, "status", "prov1"); !regexp.MustCompile(`(?m)^ssh: +127\.0\.0\.1:[0-9]+ \(on host h1\)$`).MatchString(got) ||
		!regexp.MustCompile(`(?m)^accel: +(kvm|tcg)$`).MatchString(got) || !regexp.MustCompile(`(?m)^vnc: +unix:/.*/vnc\.sock$`).MatchString(got) {
		t.Fatalf("vmctl status of the running VM lacks its backend's details:\n%s", got)
	}
	if got := vmctl(0, "log", "--provision", "prov1"); !strings.Contains(got, "==> step 3/3") || !strings.Contains(got, "3 steps done") {
		t.Fatalf("vmctl log --provision:\n%s", got)
	}
	// up again, unchanged: nothing to do.
	if got := vmctl(0, "up", "--file", f); !strings.Contains(got, "up to date and running") {
		t.Fatalf("second up:\n%s", got)
	}
	// memory changed: reported, not applied.
	vmfile("320")
	if got := vmctl(1, "up", "--file", f); !strings.Contains(got, "memory: 256 -> 320") || !strings.Contains(got, "vmctl reload") {
		t.Fatalf("up after a change:\n%s", got)
	}
	// A failing step: its number, exit code and output.
	vmfile("256")
	body, _ := os.ReadFile(f)
	os.WriteFile(f, []byte(strings.Replace(string(body), `script "scripts/setup.sh"`, `inline "echo about-to-fail; exit 3"`, 1)), 0o644)
	if got := vmctl(1, "provision", "--file", f); !strings.Contains(got, "step 3 (shell") || !strings.Contains(got, "exit code 3") || !strings.Contains(got, "about-to-fail") {
		t.Fatalf("provision with a failing step:\n%s", got)
	}
	vmctl(0, "down", "--destroy", "--file", f)
	if got := vmctl(0, "status", "prov1"); !strings.Contains(got, "destroyed") {
		t.Fatalf("status after down --destroy:\n%s", got)
	}
}

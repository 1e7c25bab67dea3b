package qemu_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/testenv/require"
)

// wantErr fails unless err is non-nil and its message has every part.
func wantErr(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one mentioning %q", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Fatalf("error %q does not mention %q", err, p)
		}
	}
}

// noWorkDir fails if the VM's work dir exists.
func noWorkDir(t *testing.T, dataDir, name string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(dataDir, "vms", name)); err == nil {
		t.Fatalf("a failed Prepare left %s behind", filepath.Join(dataDir, "vms", name))
	}
}

func TestBadInput(t *testing.T) {
	t.Parallel()
	needQEMU(t)
	dataDir := shortTempDir(t)
	b := newBackend(t, qemu.Options{DataDir: dataDir})
	ctx := ctxT(t, time.Minute)
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(raw, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(raw, 64<<20); err != nil {
		t.Fatal(err)
	}

	t.Run("MissingBaseImage", func(t *testing.T) {
		_, err := b.Prepare(ctx, testSpec(filepath.Join(dir, "nope.qcow2"), "bad-missing"))
		wantErr(t, err, "preparing vm bad-missing", "nope.qcow2", "no such file", "spec.image_path")
		noWorkDir(t, dataDir, "bad-missing")
	})
	t.Run("NotAnImage", func(t *testing.T) {
		txt := filepath.Join(dir, "notes.txt")
		if err := os.WriteFile(txt, []byte("hello, I am not a disk\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := b.Prepare(ctx, testSpec(txt, "bad-text"))
		wantErr(t, err, "notes.txt", "does not look like a disk image")
		noWorkDir(t, dataDir, "bad-text")

		_, err = b.Prepare(ctx, testSpec(dir, "bad-dir"))
		wantErr(t, err, "is not a file")
		noWorkDir(t, dataDir, "bad-dir")
	})
	t.Run("UnreadableImage", func(t *testing.T) {
		// A qcow2 whose backing file is gone: qemu-img info fails.
		broken := filepath.Join(dir, "broken.qcow2")
		out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", filepath.Join(dir, "gone.raw"), broken, "64M").CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img create: %v: %s", err, out)
		}
		_, err = b.Prepare(ctx, testSpec(broken, "bad-broken"))
		wantErr(t, err, "broken.qcow2", "backing file", "gone.raw", "does not exist")
		noWorkDir(t, dataDir, "bad-broken")
	})
	t.Run("UEFIWithoutOVMF", func(t *testing.T) {
		nb := newBackend(t, qemu.Options{DataDir: dataDir, Firmware: []qemu.FirmwarePair{{Code: filepath.Join(dir, "CODE.fd"), Vars: filepath.Join(dir, "VARS.fd")}}})
		spec := testSpec(raw, "bad-uefi")
		spec.UEFI = true
		_, err := nb.Prepare(ctx, spec)
		wantErr(t, err, "uefi", "OVMF", "install ovmf")
		noWorkDir(t, dataDir, "bad-uefi")
	})
	t.Run("BadName", func(t *testing.T) {
		for _, name := range []string{"../escape", "Upper", "", "a/b"} {
			_, err := b.Prepare(ctx, testSpec(raw, name))
			if !errors.Is(err, api.ErrInvalid) {
				t.Fatalf("Prepare(%q) = %v, want ErrInvalid", name, err)
			}
			if _, err := b.State(ctx, api.VmHandle{Name: name}); err == nil {
				t.Fatalf("State(%q) succeeded", name)
			}
		}
		if _, err := os.Stat(filepath.Join(dataDir, "escape")); err == nil {
			t.Fatal("a bad name created a directory outside vms/")
		}
	})
	t.Run("DiskSmallerThanBase", func(t *testing.T) {
		big := filepath.Join(dir, "big.qcow2")
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", big, "3G").CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create: %v: %s", err, out)
		}
		spec := testSpec(big, "bad-small")
		spec.DiskGB = 1
		_, err := b.Prepare(ctx, spec)
		wantErr(t, err, "spec.disk_gb", "at least 3 GiB")
		noWorkDir(t, dataDir, "bad-small")
	})
	t.Run("Network", func(t *testing.T) {
		spec := testSpec(raw, "bad-tap")
		spec.Network = &api.NetworkConfig{Type: api.NetworkTap}
		_, err := b.Prepare(ctx, spec)
		wantErr(t, err, "bridge")
		spec.Network = &api.NetworkConfig{Type: api.NetworkVnic, Name: "vnic0"}
		if _, err := b.Prepare(ctx, spec); !errors.Is(err, backends.ErrUnsupported) {
			t.Fatalf("vnic Prepare = %v, want ErrUnsupported", err)
		}
		noWorkDir(t, dataDir, "bad-tap")
	})
	t.Run("UnknownVM", func(t *testing.T) {
		ghost := api.VmHandle{ID: "x", Name: "ghost", Backend: api.BackendQEMU}
		if _, err := b.State(ctx, ghost); !errors.Is(err, backends.ErrNotFound) {
			t.Fatalf("State = %v, want ErrNotFound", err)
		}
		if _, err := b.Start(ctx, ghost); !errors.Is(err, backends.ErrNotFound) {
			t.Fatalf("Start = %v, want ErrNotFound", err)
		}
		if _, _, err := b.Adopt(ctx, ghost, api.StateRunning); !errors.Is(err, backends.ErrNotFound) {
			t.Fatalf("Adopt = %v, want ErrNotFound", err)
		}
		if err := b.Destroy(ctx, ghost); err != nil {
			t.Fatalf("Destroy = %v, want nil", err)
		}
	})
	t.Run("NotRunning", func(t *testing.T) {
		spec := testSpec(raw, "idle")
		spec.Network = &api.NetworkConfig{Type: api.NetworkNone}
		h, err := b.Prepare(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Destroy(ctx, h)
		if _, err := b.Suspend(ctx, h); !errors.Is(err, backends.ErrNotRunning) {
			t.Fatalf("Suspend = %v, want ErrNotRunning", err)
		}
		if _, err := b.Resume(ctx, h); !errors.Is(err, backends.ErrNotRunning) {
			t.Fatalf("Resume = %v, want ErrNotRunning", err)
		}
		if _, err := b.GuestIP(ctx, h); !errors.Is(err, backends.ErrNoAddress) {
			t.Fatalf("GuestIP without network = %v, want ErrNoAddress", err)
		}
		// An older incarnation's handle is not this VM.
		old := h
		old.ID = "older"
		if _, err := b.State(ctx, old); !errors.Is(err, backends.ErrNotFound) {
			t.Fatalf("State(old id) = %v, want ErrNotFound", err)
		}
		if err := b.Destroy(ctx, old); err != nil {
			t.Fatal(err)
		}
		if st, err := b.State(ctx, h); err != nil || st != api.StatePrepared {
			t.Fatalf("Destroy of an older incarnation touched the current one: %s, %v", st, err)
		}
	})
	t.Run("StartFailureReportsStderr", func(t *testing.T) {
		h, err := b.Prepare(ctx, testSpec(raw, "corrupt"))
		if err != nil {
			t.Fatal(err)
		}
		defer b.Destroy(ctx, h)
		if err := os.WriteFile(filepath.Join(h.WorkDir, "disk.qcow2"), []byte("garbage"), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err = b.Start(ctx, h)
		wantErr(t, err, "starting vm corrupt", "qemu stderr", "disk.qcow2")
		t.Logf("start error: %v", err)
		if st, err := b.State(ctx, h); err != nil || st != api.StatePrepared {
			t.Fatalf("State after a failed start = %s, %v; want prepared", st, err)
		}
		for _, f := range []string{"qemu.pid", "qmp.sock", "serial.sock"} {
			if _, err := os.Stat(filepath.Join(h.WorkDir, f)); err == nil {
				t.Errorf("failed start left %s", f)
			}
		}
	})
}

func TestNewBadOptions(t *testing.T) {
	t.Parallel()
	needQEMU(t)
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := qemu.New(qemu.Options{DataDir: filepath.Join(file, "data")})
	wantErr(t, err, "data dir", "--data-dir")
	if os.Geteuid() != 0 {
		ro := t.TempDir()
		if err := os.Chmod(ro, 0o555); err != nil {
			t.Fatal(err)
		}
		_, err = qemu.New(qemu.Options{DataDir: ro})
		wantErr(t, err, "data dir")
	}
	_, err = qemu.New(qemu.Options{DataDir: t.TempDir(), QEMUBinary: "qemu-system-none-such"})
	wantErr(t, err, "qemu-system-none-such not found", "install qemu-system-x86")
	_, err = qemu.New(qemu.Options{DataDir: t.TempDir(), Accel: "hvf"})
	wantErr(t, err, "accel")
	_, err = qemu.New(qemu.Options{})
	wantErr(t, err, "data dir")
}

// Not parallel: it changes PATH for the whole process.
func TestNewQEMUNotInPath(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := qemu.New(qemu.Options{DataDir: t.TempDir()})
	wantErr(t, err, "qemu-system-x86_64 not found", "install qemu-system-x86")
}

func TestDiskResizeAndUEFI(t *testing.T) {
	t.Parallel()
	img := guestImage(t)
	b := newBackend(t, qemu.Options{})
	ctx := ctxT(t, 2*time.Minute)
	spec := testSpec(img, "uefi1")
	spec.DiskGB = 2
	spec.UEFI = true
	h, err := b.Prepare(ctx, spec)
	if err != nil {
		if strings.Contains(err.Error(), "no OVMF") {
			require.Require(t, false, "OVMF not installed (apt-get install ovmf): "+err.Error())
		}
		t.Fatal(err)
	}
	defer b.Destroy(context.Background(), h)
	out, err := exec.Command("qemu-img", "info", "--output=json", filepath.Join(h.WorkDir, "disk.qcow2")).Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), `"virtual-size": 2147483648`) || !strings.Contains(string(out), img) {
		t.Fatalf("overlay is not 2 GiB over the base image:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(h.WorkDir, "OVMF_VARS.fd")); err != nil {
		t.Fatalf("no per-VM UEFI vars: %v", err)
	}
	// The same name again is the same VM.
	h2, err := b.Prepare(ctx, spec)
	if err != nil || h2.ID != h.ID || qd(h2).MAC != qd(h).MAC {
		t.Fatalf("second Prepare = %+v, %v; want the same VM", h2, err)
	}
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	if st, err := b.State(ctx, h); err != nil || st != api.StateRunning {
		t.Fatalf("State = %s, %v", st, err)
	}
	if err := b.Destroy(ctx, h); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(h.WorkDir); err == nil {
		t.Fatal("Destroy left the work dir")
	}
}

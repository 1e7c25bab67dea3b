package guestimage

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/testenv/require"
)

// needInputs skips when the build inputs are not installed (scripts/test
// fails instead).
func needInputs(t *testing.T) *inputs {
	t.Helper()
	in, err := (Options{}).inputs()
	if err != nil {
		require.Require(t, false, missingInputs(err))
	}
	return in
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestBuildDeterministicAndCached builds twice in separate cache dirs (same
// bytes) and twice concurrently in one (one build, one path).
func TestBuildDeterministicAndCached(t *testing.T) {
	t.Parallel()
	needInputs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d1, d2 := t.TempDir(), t.TempDir()
	var wg sync.WaitGroup
	paths := make([]string, 3)
	errs := make([]error, 3)
	start := time.Now()
	for i, d := range []string{d1, d1, d2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			paths[i], errs[i] = Build(ctx, d)
		}()
	}
	wg.Wait()
	t.Logf("three builds took %v", time.Since(start))
	for i, err := range errs {
		if err != nil {
			t.Fatalf("build %d: %v", i, err)
		}
	}
	if paths[0] != paths[1] {
		t.Fatalf("concurrent builds in one cache dir gave %s and %s", paths[0], paths[1])
	}
	if fileSum(t, paths[0]) != fileSum(t, paths[2]) {
		t.Fatalf("builds differ: %s vs %s", paths[0], paths[2])
	}
	if filepath.Base(paths[0]) != filepath.Base(paths[2]) {
		t.Fatalf("cache keys differ: %s vs %s", paths[0], paths[2])
	}
	out, err := exec.Command("qemu-img", "info", "--output=json", paths[0]).Output()
	if err != nil || !strings.Contains(string(out), `"format": "qcow2"`) {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	ents, _ := os.ReadDir(d1)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".build-") {
			t.Errorf("build left %s", e.Name())
		}
	}
	// A cached image is found without a rebuild.
	start = time.Now()
	p, err := Build(ctx, d1)
	if err != nil || p != paths[0] {
		t.Fatalf("cached Build = %s, %v", p, err)
	}
	t.Logf("cached build took %v", time.Since(start))
}

// TestREADMECommandRelativeCache runs the README's command as a user does,
// with a relative cache dir in a fresh directory: the builder runs its
// tools in a build directory of its own, so a relative path must not leak
// into them, and the printed path must work from anywhere.
func TestREADMECommandRelativeCache(t *testing.T) {
	t.Parallel()
	needInputs(t)
	bin := filepath.Join(t.TempDir(), "vmherd-guest")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/vmherd-guest").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	work := t.TempDir()
	cmd := exec.Command(bin, "-cache", ".cache/guest")
	cmd.Dir = work
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("vmherd-guest -cache .cache/guest: %v\n%s", err, stderr.Bytes())
	}
	p := strings.TrimSpace(string(out))
	if !filepath.IsAbs(p) {
		t.Fatalf("printed path %q is not absolute", p)
	}
	if want := filepath.Join(work, ".cache", "guest") + string(filepath.Separator); !strings.HasPrefix(p, want) {
		t.Fatalf("image %s is not under %s", p, want)
	}
	if fi, err := os.Stat(p); err != nil || fi.Size() == 0 {
		t.Fatalf("image %s: %v", p, err)
	}
}

type cpioEntry struct {
	mode, rmajor, rminor uint64
	data                 []byte
}

// readCpio parses a newc archive.
func readCpio(t *testing.T, b []byte) (map[string]cpioEntry, []string) {
	t.Helper()
	m := map[string]cpioEntry{}
	var order []string
	for off := 0; ; {
		if off+110 > len(b) || string(b[off:off+6]) != "070701" {
			t.Fatalf("bad cpio header at %d", off)
		}
		field := func(i int) uint64 {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
		size, nameLen := int(field(6)), int(field(11))
		e := cpioEntry{mode: field(1), rmajor: field(9), rminor: field(10)}
		name := string(b[off+110 : off+110+nameLen-1])
		off = (off + 110 + nameLen + 3) &^ 3
		e.data = b[off : off+size]
		off = (off + size + 3) &^ 3
		if name == "TRAILER!!!" {
			return m, order
		}
		m[name] = e
		order = append(order, name)
	}
}

func TestInitramfs(t *testing.T) {
	t.Parallel()
	in := needInputs(t)
	gz, err := in.initramfs()
	if err != nil {
		t.Fatal(err)
	}
	again, _ := in.initramfs()
	if !bytes.Equal(gz, again) {
		t.Fatal("initramfs is not deterministic")
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	files, _ := readCpio(t, raw)
	console, ok := files["dev/console"]
	if !ok || console.mode != 0o020600 || console.rmajor != 5 || console.rminor != 1 {
		t.Fatalf("dev/console = %+v, want a char device 5:1", console)
	}
	if e := files["init"]; e.mode&0o111 == 0 || !bytes.HasPrefix(e.data, []byte("#!/bin/busybox sh")) {
		t.Fatalf("init is not an executable script: mode %o", e.mode)
	}
	if e := files["etc/acpi/PWRF/00000080"]; e.mode&0o111 == 0 || !bytes.Contains(e.data, []byte("poweroff -f")) {
		t.Fatal("no executable power button handler")
	}
	if _, ok := files["bin/busybox"]; !ok {
		t.Fatal("no busybox")
	}
	order := strings.Fields(string(files["etc/modules"].data))
	pos := map[string]int{}
	for i, m := range order {
		pos[strings.TrimSuffix(m, ".ko")] = i
		if _, ok := files["lib/modules/"+m]; !ok {
			t.Fatalf("module %s listed but not packed", m)
		}
	}
	for _, dep := range [][2]string{{"virtio_ring", "virtio_net"}, {"failover", "net_failover"}, {"net_failover", "virtio_net"},
		{"libata", "ahci"}, {"cdrom", "sr_mod"}, {"evdev", "button"}} {
		a, okA := pos[dep[0]]
		b, okB := pos[dep[1]]
		if (okA && okB && a > b) || !okB {
			t.Errorf("module order %v: want %s before %s", order, dep[0], dep[1])
		}
	}
	for _, m := range []string{"isofs", "virtio_pci", "evdev", "button", "sr_mod", "ahci", "virtio_net"} {
		if _, ok := pos[m]; !ok {
			t.Errorf("module %s missing from %v", m, order)
		}
	}
}

func TestResolveModules(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	dep := `kernel/a/top.ko: kernel/b/mid.ko kernel/c/low.ko
kernel/b/mid.ko: kernel/c/low.ko
kernel/c/low.ko:
kernel/d/other.ko: kernel/c/low.ko
`
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/x/builtin-thing.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := resolveModules(dir, []string{"top", "other", "builtin_thing"})
	if err != nil {
		t.Fatal(err)
	}
	want := "kernel/c/low.ko kernel/b/mid.ko kernel/a/top.ko kernel/d/other.ko"
	if strings.Join(got, " ") != want {
		t.Fatalf("order = %v, want %s", got, want)
	}
	if _, err := resolveModules(dir, []string{"nosuch"}); err == nil || !strings.Contains(err.Error(), "nosuch") {
		t.Fatalf("unknown module: %v", err)
	}
}

func TestMissingInputs(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	_, err := BuildWith(context.Background(), dir, Options{BootDir: dir})
	if err == nil || !strings.Contains(err.Error(), "linux-image-amd64") {
		t.Fatalf("no kernel: %v", err)
	}
	needInputs(t)
	_, err = BuildWith(context.Background(), dir, Options{Busybox: filepath.Join(dir, "busybox")})
	if err == nil || !strings.Contains(err.Error(), "busybox-static") {
		t.Fatalf("no busybox: %v", err)
	}
	_, err = BuildWith(context.Background(), dir, Options{Busybox: "/bin/ls"}) // dynamically linked
	if err == nil || !strings.Contains(err.Error(), "static") {
		t.Fatalf("dynamic busybox: %v", err)
	}
}

// TestBoots boots the image from disk alone (no seed, no NIC) and waits
// for the ready marker on the serial console.
func TestBoots(t *testing.T) {
	t.Parallel()
	_, err := exec.LookPath("qemu-system-x86_64")
	require.Require(t, err == nil, "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
	img := EnsureForTest(t)
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "128",
		"-nodefaults", "-display", "none", "-nic", "none", "-no-reboot",
		"-serial", "file:"+logPath,
		"-drive", "file="+img+",if=virtio,format=qcow2,snapshot=on")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	for {
		b, _ := os.ReadFile(logPath)
		if bytes.Contains(b, []byte(ReadyMarker)) {
			for _, want := range []string{"SYSLINUX", "vmherd-guest: booting", "no cidata seed found"} {
				if !bytes.Contains(b, []byte(want)) {
					t.Errorf("console lacks %q:\n%s", want, b)
				}
			}
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no %s on the console; console:\n%s\nstderr: %s", ReadyMarker, b, stderr.String())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

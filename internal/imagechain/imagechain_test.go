package imagechain_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/imagechain"
	"github.com/vmherd/vmherd/internal/imagechain/corpus"
	"github.com/vmherd/vmherd/internal/testenv/require"
)

func needQEMUImg(t *testing.T) {
	t.Helper()
	_, err := exec.LookPath("qemu-img")
	require.Require(t, err == nil, "qemu-img not installed (apt-get install qemu-utils)")
}

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v: %s", args, err, out)
	}
}

// Every hostile image is refused, by qemu-img's description and by the
// headers alone, naming its reason; no qemu-img is left running on a FIFO.
func TestHostileImages(t *testing.T) {
	t.Parallel()
	needQEMUImg(t)
	dir := t.TempDir()
	root, outside := filepath.Join(dir, "images"), filepath.Join(dir, "outside")
	for _, d := range []string{root, outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cases := corpus.Images(t, "", root, outside)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, p := range []imagechain.Policy{{Roots: []string{root}}, {Roots: []string{root}, HeaderOnly: true}} {
		for _, c := range cases {
			start := time.Now()
			_, err := p.Inspect(ctx, c.Path, "")
			if p.HeaderOnly && strings.Contains(c.Want, "virtual size") {
				continue // sizes are qemu-img's to tell
			}
			if !p.HeaderOnly {
				t.Logf("%s: %v", c.Name, err)
			}
			if !errors.Is(err, imagechain.ErrRefused) || !strings.Contains(err.Error(), c.Want) {
				t.Errorf("%s (header only %v): %v\nwant a refusal with %q", c.Name, p.HeaderOnly, err, c.Want)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("%s: %v to refuse", c.Name, d)
			}
		}
	}
	t.Logf("%d hostile images refused", len(cases))
	// A pulled image may name no file at all.
	self := imagechain.Policy{SelfContained: true}
	for _, name := range []string{"backing-abs.qcow2", "datafile.qcow2", "flat.vmdk", "child.vmdk", "backing.qed", "inside-chain.qcow2"} {
		path := filepath.Join(root, name)
		if name == "inside-chain.qcow2" {
			qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "inside.raw", path)
		}
		if _, err := self.Inspect(ctx, path, ""); err == nil || !strings.Contains(err.Error(), "must stand alone") {
			t.Errorf("self-contained %s: %v", name, err)
		}
	}
}

// Chains that stay inside the roots are described layer by layer, with
// their formats, and the files their layers open.
func TestConfinedChains(t *testing.T) {
	t.Parallel()
	needQEMUImg(t)
	root := t.TempDir()
	other := t.TempDir()
	vms := filepath.Join(root, "vms")
	if err := os.Mkdir(vms, 0o755); err != nil {
		t.Fatal(err)
	}
	in := func(n string) string { return filepath.Join(root, n) }
	if err := os.WriteFile(in("base.raw"), make([]byte, 2<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", in("mid.qcow2"))
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", in("mid.qcow2"), in("top.qcow2"))
	if err := os.WriteFile(in("flat.vmdk"), []byte("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 4096 FLAT \"base.raw\" 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, "create", "-q", "-f", "vmdk", in("sparse.vmdk"), "1M")
	p := imagechain.Policy{Roots: []string{root, other}, Exclude: []string{vms}}
	ctx := context.Background()

	c, err := p.Inspect(ctx, in("top.qcow2"), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(c) != 3 || c[0].Format != "qcow2" || c[1].Path != in("mid.qcow2") || c[2].Format != "raw" || c[2].Path != in("base.raw") || c[2].VirtualSize != 2<<20 {
		t.Fatalf("chain %+v", c)
	}
	c, err = p.Inspect(ctx, in("flat.vmdk"), "vmdk")
	if err != nil || len(c) != 1 || len(c[0].Files) != 1 || c[0].Files[0] != in("base.raw") {
		t.Fatalf("vmdk with a flat extent inside: %+v %v", c, err)
	}
	if c, err = p.Inspect(ctx, in("sparse.vmdk"), ""); err != nil || len(c[0].Files) != 0 {
		t.Fatalf("sparse vmdk: %+v %v", c, err)
	}
	// Pinned formats are used: the raw file as qcow2 is not qcow2.
	if _, err := p.Inspect(ctx, in("base.raw"), "qcow2"); err == nil {
		t.Fatal("a raw file read as qcow2")
	}
	// A layer in the VMs' work directory, a char device, a small raw guess.
	qemuImg(t, "create", "-q", "-f", "qcow2", filepath.Join(vms, "disk.qcow2"), "1M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", filepath.Join(vms, "disk.qcow2"), in("onvm.qcow2"))
	for path, want := range map[string]string{
		in("onvm.qcow2"): "inside the VMs' work directory",
		"/dev/null":      "outside every image root",
	} {
		if _, err := p.Inspect(ctx, path, ""); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", path, err, want)
		}
	}
	if _, err := (imagechain.Policy{Roots: []string{"/dev"}}).Inspect(ctx, "/dev/null", ""); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("a char device: %v", err)
	}
	if err := os.WriteFile(in("notes.txt"), []byte("not a disk\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Inspect(ctx, in("notes.txt"), ""); err == nil || !strings.Contains(err.Error(), "does not look like a disk image") {
		t.Errorf("a text file: %v", err)
	}
	// A smaller bound on virtual sizes.
	small := p
	small.MaxVirtualSize = 1 << 20
	if _, err := small.Inspect(ctx, in("top.qcow2"), ""); err == nil || !strings.Contains(err.Error(), "virtual size") {
		t.Errorf("virtual size over a bound of 1 MiB: %v", err)
	}
}

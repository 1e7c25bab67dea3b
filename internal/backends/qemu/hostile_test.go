package qemu_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/imagechain"
	"github.com/vmherd/vmherd/internal/imagechain/corpus"
)

// snapshot lists a tree's files with their sizes and times, to show
// nothing was written there.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		out[p] = info.Mode().String() + " " + strconv.FormatInt(info.Size(), 10) + " " + info.ModTime().String()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameTree(t *testing.T, what string, before, after map[string]string) {
	t.Helper()
	for p, v := range after {
		if before[p] != v {
			t.Errorf("%s: %s changed or appeared (%s)", what, p, v)
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			t.Errorf("%s: %s went away", what, p)
		}
	}
}

// A base image whose chain leaves the image roots is refused at prepare,
// naming the file and the rule, and leaves nothing behind (issue #22,
// item 1: before, the prepare succeeded and QEMU opened the outside file).
func TestHostileImagesPrepare(t *testing.T) {
	t.Parallel()
	needQEMU(t)
	dir := t.TempDir()
	root, outside := filepath.Join(dir, "images"), filepath.Join(dir, "outside")
	for _, d := range []string{root, outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cases := corpus.Images(t, "", root, outside)
	dataDir := shortTempDir(t)
	b := newBackend(t, qemu.Options{DataDir: dataDir, ImageRoots: []string{root}})
	ctx := ctxT(t, 2*time.Minute)
	before, beforeRoot := snapshot(t, outside), snapshot(t, root)
	for i, c := range cases {
		name := "hostile" + strconv.Itoa(i)
		_, err := b.Prepare(ctx, testSpec(c.Path, name))
		if !errors.Is(err, imagechain.ErrRefused) || !strings.Contains(err.Error(), c.Want) {
			t.Errorf("%s: Prepare = %v\nwant a refusal with %q", c.Name, err, c.Want)
		}
		noWorkDir(t, dataDir, name)
	}
	sameTree(t, "outside", before, snapshot(t, outside))
	sameTree(t, "the image root", beforeRoot, snapshot(t, root))
	t.Logf("%d hostile images refused at prepare", len(cases))
}

// A chain checked at prepare is checked again at start: a base image
// replaced in the root by one whose backing file is outside is refused,
// and QEMU is given each layer with its format (-blockdev), so it opens
// only the layers checked.
func TestChainCheckedAtStart(t *testing.T) {
	t.Parallel()
	needQEMU(t)
	dir := t.TempDir()
	root, outside := filepath.Join(dir, "images"), filepath.Join(dir, "outside")
	for _, d := range []string{root, outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	img := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v: %s", args, err, out)
		}
	}
	in := func(n string) string { return filepath.Join(root, n) }
	if err := os.WriteFile(in("inside.raw"), make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(outside, "secret.raw")
	if err := os.WriteFile(secret, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "inside.raw", in("base.qcow2"))
	dataDir := shortTempDir(t)
	b := newBackend(t, qemu.Options{DataDir: dataDir, ImageRoots: []string{root}, Accel: qemu.AccelTCG})
	ctx := ctxT(t, 2*time.Minute)
	spec := testSpec(in("base.qcow2"), "chain1")
	spec.Network = &api.NetworkConfig{Type: api.NetworkNone}
	h, err := b.Prepare(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Destroy(context.Background(), h) })
	// Only the worker's user reads a VM's files (issue #22, item 7).
	for _, f := range []string{"", "disk.qcow2", "seed.iso", "console.log", "vm.json"} {
		st, err := os.Stat(filepath.Join(h.WorkDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s is %v: others may read it", filepath.Join(h.WorkDir, f), st.Mode().Perm())
		}
	}
	if st, err := os.Stat(filepath.Join(dataDir, "vms")); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("the VMs' directory: %v %v", st.Mode(), err)
	}

	// The base is swapped for one reaching outside: start refuses.
	img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret, in("evil.qcow2"))
	if err := os.Rename(in("evil.qcow2"), in("base.qcow2")); err != nil {
		t.Fatal(err)
	}
	_, err = b.Start(ctx, h)
	if !errors.Is(err, imagechain.ErrRefused) || !strings.Contains(err.Error(), secret+" is outside every image root") {
		t.Fatalf("Start over a swapped base = %v, want a refusal naming %s", err, secret)
	}
	if st, err := b.State(ctx, h); err != nil || st != api.StatePrepared {
		t.Fatalf("State after a refused start = %s, %v", st, err)
	}

	// Put back, it starts, and QEMU holds only the checked layers.
	img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "inside.raw", in("good.qcow2"))
	if err := os.Rename(in("good.qcow2"), in("base.qcow2")); err != nil {
		t.Fatal(err)
	}
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	fds, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(h.PID), "fd"))
	if err != nil {
		t.Fatal(err)
	}
	held := map[string]bool{}
	for _, fd := range fds {
		if p, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(h.PID), "fd", fd.Name())); err == nil {
			held[p] = true
		}
	}
	for _, want := range []string{in("base.qcow2"), in("inside.raw"), filepath.Join(h.WorkDir, "disk.qcow2")} {
		if !held[want] {
			t.Errorf("QEMU does not hold %s (it holds %v)", want, held)
		}
	}
	for p := range held {
		if strings.HasPrefix(p, outside) {
			t.Errorf("QEMU holds %s, outside the image roots", p)
		}
	}
}

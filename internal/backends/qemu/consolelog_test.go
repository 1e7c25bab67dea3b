package qemu_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/qemu"
)

// A running VM's console log stays bounded however much the guest writes:
// rotated at 2 MiB, three older files kept (issue #26.8). The output is
// appended to the file QEMU writes (O_APPEND, as QEMU's own writes), at
// about 2.5 MB/s, far faster than a serial console (55 KB/s under TCG).
func TestConsoleLogRotated(t *testing.T) {
	t.Parallel()
	needQEMU(t)
	root := t.TempDir()
	img := filepath.Join(root, "blank.raw")
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	b := newBackend(t, qemu.Options{ImageRoots: []string{root}, Accel: qemu.AccelTCG})
	ctx := ctxT(t, 2*time.Minute)
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go func() {
		for range b.Watch(wctx) {
		}
	}()
	spec := testSpec(img, "chatty")
	spec.Network = &api.NetworkConfig{Type: api.NetworkNone}
	h, err := b.Prepare(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Destroy(context.Background(), h) })
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(qd(h).SerialLog, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	line := strings.Repeat("y", 1023) + "\n"
	chunk := []byte(strings.Repeat(line, 256)) // 256 KiB
	for i := 0; i < 40; i++ {                  // 10 MiB
		if _, err := f.Write(chunk); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := f.Write([]byte("the last line\n")); err != nil {
		t.Fatal(err)
	}
	f.Close()
	size := func(p string) int64 {
		st, err := os.Stat(p)
		if err != nil {
			return -1
		}
		return st.Size()
	}
	deadline := time.Now().Add(10 * time.Second)
	for size(qd(h).SerialLog) > qemu.DefaultLogMaxBytes {
		if time.Now().After(deadline) {
			t.Fatalf("console log still %d bytes after writing 10 MiB (bound %d)", size(qd(h).SerialLog), qemu.DefaultLogMaxBytes)
		}
		time.Sleep(50 * time.Millisecond)
	}
	total := size(qd(h).SerialLog)
	for i := 1; i <= qemu.DefaultLogKeep; i++ {
		p := qd(h).SerialLog + "." + strconv.Itoa(i)
		st, err := os.Stat(p)
		if err != nil {
			if i > 2 { // 10 MiB makes three or four rotations
				continue
			}
			t.Fatalf("rotated log %s: %v", p, err)
		}
		if st.Size() > 2*qemu.DefaultLogMaxBytes || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %d bytes, %v", p, st.Size(), st.Mode())
		}
		total += st.Size()
	}
	if _, err := os.Stat(qd(h).SerialLog + "." + strconv.Itoa(qemu.DefaultLogKeep+1)); err == nil {
		t.Errorf("more than %d rotated logs kept", qemu.DefaultLogKeep)
	}
	if bound := int64(1+2*qemu.DefaultLogKeep) * qemu.DefaultLogMaxBytes; total > bound {
		t.Errorf("console logs take %d bytes, over %d", total, bound)
	}
	t.Logf("after 10 MiB of output: %d bytes of console log on disk", total)
	// The newest output is where readers look.
	live, _ := os.ReadFile(qd(h).SerialLog)
	prev, _ := os.ReadFile(qd(h).SerialLog + ".1")
	if !strings.HasSuffix(string(prev)+string(live), "the last line\n") {
		t.Errorf("the last line is neither in the live log nor in .1")
	}
}

package qemu_test

import (
	"bufio"
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

// QEMU's display is a unix socket only root reads, in the VM's 0700 work
// dir, never a TCP port any local user could reach (VNC with security
// type None; issue #26.6). With no network, QEMU listens on no TCP port
// at all.
func TestVNCOffTheNetwork(t *testing.T) {
	t.Parallel()
	needQEMU(t)
	root := t.TempDir()
	img := filepath.Join(root, "blank.raw")
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	b := newBackend(t, qemu.Options{ImageRoots: []string{root}, Accel: qemu.AccelTCG})
	ctx := ctxT(t, 2*time.Minute)
	spec := testSpec(img, "vnc1")
	spec.Network = &api.NetworkConfig{Type: api.NetworkNone}
	h, err := b.Prepare(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Destroy(context.Background(), h) })
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(h.WorkDir, "vnc.sock")
	if qd(h).VNC != "unix:"+sock {
		t.Errorf("handle's vnc = %q, want unix:%s", qd(h).VNC, sock)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Errorf("VNC socket %s: %v %v, want a socket with mode 0600", sock, st, err)
	}
	if ports := listeningTCP(t, h.PID); len(ports) > 0 {
		t.Errorf("QEMU (pid %d) listens on TCP %v", h.PID, ports)
	}
	if err := b.Destroy(ctx, h); err != nil {
		t.Fatal(err)
	}
}

// listeningTCP lists the local addresses of the TCP sockets pid listens on.
func listeningTCP(t *testing.T, pid int) []string {
	t.Helper()
	fdDir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	fds, err := os.ReadDir(fdDir)
	if err != nil {
		t.Fatal(err)
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		if l, err := os.Readlink(filepath.Join(fdDir, fd.Name())); err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	var out []string
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(table)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
			fs := strings.Fields(sc.Text())
			if len(fs) > 9 && fs[3] == "0A" && inodes[fs[9]] {
				out = append(out, fs[1])
			}
		}
		f.Close()
	}
	return out
}

package qemu_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"os/exec"

	"golang.org/x/crypto/ssh"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/fleet"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/provision"
)

// guestRun runs a shell command in the guest over SSH (its forwarded
// port), checking the host keys it printed on its first console, which
// hostKeys remembers (a migrated copy's console log starts at the move).
func guestRun(t *testing.T, hostKeys map[string][]ssh.PublicKey, h api.VmHandle, signer ssh.Signer, cmd string) string {
	t.Helper()
	keys, ok := hostKeys[h.Name]
	if !ok {
		log, _ := os.ReadFile(qd(h).SerialLog)
		var err error
		if keys, err = provision.HostKeys(log); err != nil {
			t.Fatalf("host keys from %s: %v", qd(h).SerialLog, err)
		}
		hostKeys[h.Name] = keys
	}
	var cl *ssh.Client
	var err error
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
		if cl, err = ssh.Dial("tcp", "127.0.0.1:"+strconv.Itoa(qd(h).SSHPort), provision.ClientConfig("root", signer, keys)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ssh to the guest on port %d: %v", qd(h).SSHPort, err)
		}
	}
	defer cl.Close()
	sess, err := cl.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	out, err := sess.CombinedOutput(cmd)
	if err != nil {
		t.Fatalf("guest %q: %v: %s", cmd, err, out)
	}
	return string(out)
}

// TestLiveMigration moves a running test guest between two QEMU
// backends (two "hosts" on this machine, each with its own data dir and
// copy of the base image) and back: the disk block written before each
// move reads back after it, the boot id is the same (no reboot), a
// counter the guest prints on its console carries on, SSH answers on
// the new host's port, and the old host keeps no copy. Then a cold move
// of the stopped guest, which boots on the other host with its disk.
func TestLiveMigration(t *testing.T) { liveMigration(t, "") }

// TestLiveMigrationTLS is TestLiveMigration with both hosts' migration
// traffic over TLS (QEMU tls-creds-x509, peers checked against the CA);
// a host without TLS is refused, and so is a plain NBD client that
// tries to write to a waiting copy's export.
func TestLiveMigrationTLS(t *testing.T) {
	dir := shortTempDir(t)
	pki, err := fleet.MakePKI(filepath.Join(dir, "pki"), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	tlsDir := filepath.Join(dir, "x509")
	if err := os.Mkdir(tlsDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, from := range map[string]string{"ca-cert.pem": pki.CA, "server-cert.pem": pki.Cert, "server-key.pem": pki.Key,
		"client-cert.pem": pki.Cert, "client-key.pem": pki.Key} {
		b, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tlsDir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	liveMigration(t, tlsDir)
}

func liveMigration(t *testing.T, tlsDir string) {
	img := guestImage(t)
	hostKeys := map[string][]ssh.PublicKey{}
	ctx := ctxT(t, 2*bootTimeout+4*time.Minute)
	// Each host has its own image directory with the same base image.
	hostsB := make([]*qemu.Backend, 2)
	bases := make([]string, 2)
	for i := range hostsB {
		dir := shortTempDir(t)
		data, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		bases[i] = filepath.Join(dir, "base.img")
		if err := os.WriteFile(bases[i], data, 0o644); err != nil {
			t.Fatal(err)
		}
		hostsB[i] = newBackend(t, qemu.Options{Host: fmt.Sprintf("h%d", i+1), ImageRoots: []string{dir}, MigrationTLSDir: tlsDir})
	}
	priv, pub, err := provision.NewKey("test@vmherd")
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	spec := testSpec(bases[0], "mig1")
	spec.SSH = &api.SshConfig{User: "root", PublicKey: pub}
	h, err := hostsB[0].Prepare(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if h, err = hostsB[0].Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, b := range hostsB {
			_ = b.Destroy(context.Background(), api.VmHandle{Name: "mig1"})
		}
	})
	waitConsole(t, qd(h).SerialLog, 0, guestimage.ReadyMarker, bootTimeout)
	bootID := strings.TrimSpace(guestRun(t, hostKeys, h, signer, "cat /proc/sys/kernel/random/boot_id"))
	guestRun(t, hostKeys, h, signer, "setsid sh -c 'i=0; while :; do echo TICK $i >/dev/ttyS0; i=$((i+1)); sleep 0.2; done' </dev/null >/dev/null 2>&1 &")
	ticks := regexp.MustCompile(`TICK (\d+)`)
	lastTick := func(path string) int {
		b, _ := os.ReadFile(path)
		m := ticks.FindAllStringSubmatch(string(b), -1)
		if len(m) == 0 {
			return -1
		}
		n, _ := strconv.Atoi(m[len(m)-1][1])
		return n
	}

	// Live h1 -> h2 and back.
	firstTick := func(path string) int {
		b, _ := os.ReadFile(path)
		m := ticks.FindStringSubmatch(string(b))
		if m == nil {
			return -1
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}
	for move := 0; move < 2; move++ {
		src, dst := hostsB[move%2], hostsB[(move+1)%2]
		mark := fmt.Sprintf("VMHERD-MARK-%d-%d", move, time.Now().UnixNano())
		// A block near the end of the disk: in the overlay only, so the
		// mirror must carry it.
		guestRun(t, hostKeys, h, signer, fmt.Sprintf("s=$(cat /sys/block/vda/size); echo %s | dd of=/dev/vda bs=512 seek=$((s-16-%d)) conv=fsync 2>/dev/null", mark, move))
		before := lastTick(qd(h).SerialLog)
		if before < 0 {
			waitConsole(t, qd(h).SerialLog, 0, "TICK", 30*time.Second)
			before = lastTick(qd(h).SerialLog)
		}
		srcH := h
		srcH.Spec = &api.VmSpec{}
		*srcH.Spec = *h.Spec
		srcH.Spec.ImagePath = bases[(move+1)%2]
		copyH, ep, err := dst.Receive(ctx, srcH, bases[(move+1)%2], backends.Receiving{Mode: "live", Listen: "127.0.0.1", PortLo: 49152, PortHi: 49215})
		if err != nil {
			t.Fatalf("move %d: Receive: %v", move, err)
		}
		if tlsDir != "" && move == 0 {
			if !strings.HasPrefix(ep, "tls+") {
				t.Fatalf("a TLS host's endpoint %q is not marked tls+", ep)
			}
			// A host without TLS files is refused before it sends.
			plain := newBackend(t, qemu.Options{Host: "plain"})
			if _, err := plain.Send(ctx, h, ep, backends.SendOptions{}, func(backends.MigrationProgress) {}); err == nil || !strings.Contains(err.Error(), "TLS only") {
				t.Fatalf("a plain host sending to a TLS target: %v", err)
			}
			// An attacker on the migration network, without a
			// certificate, cannot open the copy's disk export.
			nbdAddr, _, _ := strings.Cut(strings.TrimPrefix(ep, "tls+"), "|")
			out, err := exec.CommandContext(ctx, "qemu-img", "info", "nbd://"+nbdAddr+"/disk").CombinedOutput()
			if err == nil {
				t.Fatalf("a plain NBD client opened the TLS export: %s", out)
			}
			t.Logf("a plain NBD client is refused: %s", strings.TrimSpace(string(out)))
		}
		began := time.Now()
		p, err := src.Send(ctx, h, ep, backends.SendOptions{Stall: 30 * time.Second, DowntimeMS: 300}, func(backends.MigrationProgress) {})
		if err != nil {
			t.Fatalf("move %d: Send: %v", move, err)
		}
		took := time.Since(began)
		nh, err := dst.Activate(ctx, copyH, api.StateRunning)
		if err != nil {
			t.Fatalf("move %d: Activate: %v", move, err)
		}
		if err := src.Destroy(ctx, h); err != nil {
			t.Fatalf("move %d: removing the source's copy: %v", move, err)
		}
		t.Logf("move %d: %s, %d bytes, downtime %d ms", move, took.Round(time.Millisecond), p.Bytes, p.DowntimeMS)
		if _, err := os.Stat(h.WorkDir); err == nil {
			t.Errorf("move %d: the source keeps its work dir %s", move, h.WorkDir)
		}
		if nh.PID == 0 || qd(nh).MAC != qd(h).MAC || nh.ID == h.ID {
			t.Errorf("move %d: the copy's handle %+v (the source's MAC %s, id %s)", move, nh, qd(h).MAC, h.ID)
		}
		h = nh
		if st, err := dst.State(ctx, h); err != nil || st != api.StateRunning {
			t.Fatalf("move %d: state on the destination %s, %v", move, st, err)
		}
		if got := strings.TrimSpace(guestRun(t, hostKeys, h, signer, "cat /proc/sys/kernel/random/boot_id")); got != bootID {
			t.Errorf("move %d: boot id %s, was %s: the guest rebooted", move, got, bootID)
		}
		got := guestRun(t, hostKeys, h, signer, fmt.Sprintf("s=$(cat /sys/block/vda/size); dd if=/dev/vda bs=512 skip=$((s-16-%d)) count=1 2>/dev/null | head -c %d", move, len(mark)))
		if got != mark {
			t.Errorf("move %d: the disk block written before the move reads %q, want %q", move, got, mark)
		}
		// The counter carries on where it was (no reboot, no restart).
		for deadline := time.Now().Add(30 * time.Second); lastTick(qd(h).SerialLog) < before+3; time.Sleep(200 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("move %d: the console counter was at %d before the move; on the new host it shows %d", move, before, lastTick(qd(h).SerialLog))
			}
		}
		if first := firstTick(qd(h).SerialLog); first < before || first > before+50 {
			t.Errorf("move %d: the counter on the new host starts at %d, was at %d before the move", move, first, before)
		}
	}

	// Cold: stopped on h1, moved to h2, boots there with its disk.
	if _, err := hostsB[0].Stop(ctx, h, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	ep, size, digest, err := hostsB[0].Export(ctx, h, backends.Receiving{Listen: "127.0.0.1", PortLo: 49152, PortHi: 49215})
	if err != nil {
		t.Fatalf("Export: %v", err)
	}
	srcH := h
	srcH.Spec = &api.VmSpec{}
	*srcH.Spec = *h.Spec
	copyH, _, err := hostsB[1].Receive(ctx, srcH, bases[1], backends.Receiving{Mode: "cold", From: ep, FromSize: size, FromDigest: digest})
	if err != nil {
		t.Fatalf("cold Receive: %v", err)
	}
	_ = hostsB[0].Unexport(ctx, h)
	if _, err := hostsB[1].Activate(ctx, copyH, api.StateStopped); err != nil {
		t.Fatal(err)
	}
	if err := hostsB[0].Destroy(ctx, h); err != nil {
		t.Fatal(err)
	}
	h, err = hostsB[1].Start(ctx, copyH)
	if err != nil {
		t.Fatalf("start after the cold move: %v", err)
	}
	waitConsole(t, qd(h).SerialLog, 0, guestimage.ReadyMarker, bootTimeout)
	delete(hostKeys, h.Name) // the test guest makes new host keys at each boot
	got := guestRun(t, hostKeys, h, signer, "s=$(cat /sys/block/vda/size); dd if=/dev/vda bs=512 skip=$((s-17)) count=1 2>/dev/null | head -c 11")
	if got != "VMHERD-MARK" {
		t.Errorf("after the cold move the disk block reads %q, want the mark of the last live move", got)
	}
}

// Endpoints another host's worker reports reach QEMU's option strings and
// URIs only as an IP or DNS name and a port number.
func TestMigrationEndpointsChecked(t *testing.T) {
	b := newBackend(t, qemu.Options{})
	for _, ep := range []string{
		"10.0.0.1:49152,file.filename=/etc/shadow|10.0.0.1:49153",
		"10.0.0.1:49152|exec:sh -c x",
		"10.0.0.1:49152|10.0.0.1:0",
		"a,b:49152|10.0.0.1:49153",
		"10.0.0.1:049152|10.0.0.1:49153",
	} {
		_, err := b.Send(context.Background(), api.VmHandle{Name: "x"}, ep, backends.SendOptions{}, func(backends.MigrationProgress) {})
		if err == nil || !strings.Contains(err.Error(), "migration endpoint") {
			t.Errorf("Send to %q: %v, want the endpoint refused", ep, err)
		}
	}
	cold := backends.Receiving{Mode: "cold", From: "nbd://10.0.0.1:1,file.driver=file/disk", Listen: "127.0.0.1", PortLo: 49152, PortHi: 49153}
	if _, _, err := b.Receive(context.Background(), api.VmHandle{Name: "x", Spec: &api.VmSpec{Name: "x"}}, "/nonexistent", cold); err == nil {
		t.Error("a cold receive from an endpoint with options was not refused")
	}
	// The source's handle data reaches this host's QEMU command line:
	// its MAC, accelerator and spec are checked before anything is made.
	live := backends.Receiving{Mode: "live", Listen: "127.0.0.1", PortLo: 49152, PortHi: 49153}
	spec := &api.VmSpec{Name: "x", Backend: api.BackendQEMU, Vcpus: 1, MemoryMB: 128, DiskGB: 1, ImagePath: "/nonexistent/base.qcow2"}
	for _, c := range []struct {
		data, spec string
		want       string
	}{
		{`{"mac":"52:54:00:aa:bb:cc,romfile=/etc/shadow"}`, "", "mac"},
		{`{"mac":"52:54:00:aa:bb:cc:dd:ee"}`, "", "mac"},
		{`{"accel":"kvm,kernel-irqchip=off"}`, "", "accel"},
		{`{}`, "../../etc", "spec"},
	} {
		s := *spec
		if c.spec != "" {
			s.Name = c.spec
		}
		h := api.VmHandle{ID: "src", Name: "x", Backend: api.BackendQEMU, Spec: &s, Data: json.RawMessage(c.data)}
		_, _, err := b.Receive(context.Background(), h, "/nonexistent", live)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("receive of data %s spec name %q: %v, want it refused naming the %s", c.data, s.Name, err, c.want)
		}
	}
}

package qemu_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/testenv/require"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
)

// needRootTools skips unless running as root with the named tools
// (scripts/test, which runs as root with them installed, fails instead).
func needRootTools(t *testing.T, tools ...string) {
	t.Helper()
	require.Require(t, os.Geteuid() == 0, "needs root: creates a network namespace, a bridge and tap devices")
	for _, tool := range tools {
		_, err := lookSbin(tool)
		require.Require(t, err == nil, tool+" not installed (apt-get install iproute2 dnsmasq-base)")
	}
}

// lookSbin finds a tool in PATH or the sbin directories.
func lookSbin(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		if _, serr := os.Stat(filepath.Join(d, name)); serr == nil {
			return filepath.Join(d, name), nil
		}
	}
	return "", err
}

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

var boundRE = regexp.MustCompile(`eth0 bound ([0-9.]+)/`)

// TestTapNetworking puts two VMs on a bridge in a fresh network namespace
// with dnsmasq serving DHCP there: each gets a lease, and GuestIP returns
// each its own address, matched by MAC.
func TestTapNetworking(t *testing.T) {
	t.Parallel()
	needRootTools(t, "ip", "dnsmasq")
	img := guestImage(t)
	ipBin, _ := lookSbin("ip")
	var rb [3]byte
	_, _ = rand.Read(rb[:])
	ns := "vmhtest-" + hex.EncodeToString(rb[:])
	run(t, ipBin, "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command(ipBin, "netns", "del", ns).Run() })
	run(t, ipBin, "-n", ns, "link", "set", "lo", "up")
	run(t, ipBin, "-n", ns, "link", "add", "br0", "type", "bridge")
	run(t, ipBin, "-n", ns, "addr", "add", "10.213.0.1/24", "dev", "br0")
	run(t, ipBin, "-n", ns, "link", "set", "br0", "up")

	dir := shortTempDir(t)
	leases := filepath.Join(dir, "dnsmasq.leases")
	dnsmasqBin, _ := lookSbin("dnsmasq")
	dnsmasq := exec.Command(ipBin, "netns", "exec", ns, dnsmasqBin,
		"--keep-in-foreground", "--conf-file=/dev/null", "--log-facility=-", "--log-dhcp",
		"--user=root", "--port=0", "--no-resolv", "--no-hosts",
		"--interface=br0", "--bind-interfaces",
		"--dhcp-range=10.213.0.100,10.213.0.150,255.255.255.0,1h",
		"--dhcp-leasefile="+leases, "--pid-file="+filepath.Join(dir, "dnsmasq.pid"))
	var dlog syncbuf.Buffer
	dnsmasq.Stdout, dnsmasq.Stderr = &dlog, &dlog
	if err := dnsmasq.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = dnsmasq.Process.Kill()
		_ = dnsmasq.Wait()
		if t.Failed() {
			t.Logf("dnsmasq log:\n%s", dlog.String())
		}
	})

	b := newBackend(t, qemu.Options{
		Wrapper:    []string{ipBin, "netns", "exec", ns},
		LeaseFiles: []string{leases},
	})
	ctx := ctxT(t, bootTimeout+time.Minute)
	var hs []api.VmHandle
	for _, name := range []string{"tap-a", "tap-b"} {
		spec := testSpec(img, name)
		spec.Network = &api.NetworkConfig{Type: api.NetworkTap, Bridge: "br0"}
		h, err := b.Prepare(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = b.Destroy(context.Background(), h) })
		if len(qd(h).TapDevice) == 0 || len(qd(h).TapDevice) > 15 {
			t.Fatalf("tap device name %q", qd(h).TapDevice)
		}
		if h, err = b.Start(ctx, h); err != nil {
			t.Fatal(err)
		}
		hs = append(hs, h)
	}
	if qd(hs[0]).MAC == qd(hs[1]).MAC || qd(hs[0]).TapDevice == qd(hs[1]).TapDevice {
		t.Fatalf("two VMs share a MAC or tap: %s/%s %s/%s", qd(hs[0]).MAC, qd(hs[0]).TapDevice, qd(hs[1]).MAC, qd(hs[1]).TapDevice)
	}
	ips := map[string]string{}
	for _, h := range hs {
		waitConsole(t, qd(h).SerialLog, 0, guestimage.ReadyMarker, bootTimeout)
		log := waitConsole(t, qd(h).SerialLog, 0, "eth0 bound", time.Minute)
		m := boundRE.FindStringSubmatch(log)
		if m == nil {
			t.Fatalf("%s got no DHCP lease:\n%s", h.Name, log)
		}
		var ip string
		var err error
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
			if ip, err = b.GuestIP(ctx, h); err == nil {
				break
			}
		}
		if err != nil || ip != m[1] {
			t.Fatalf("GuestIP(%s) = %q, %v; the guest says it got %s", h.Name, ip, err, m[1])
		}
		ips[h.Name] = ip
	}
	if ips["tap-a"] == ips["tap-b"] {
		t.Fatalf("both VMs report %s", ips["tap-a"])
	}
	t.Logf("guest addresses: %v", ips)

	// The tap devices' counters, read in the namespace through the
	// wrapper, from the guest's side: each guest received its DHCP offer
	// and ack and sent its discover and request.
	for _, h := range hs {
		s, err := b.Stats(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		if len(s.Nets) != 1 || s.NetsUnavailable != "" {
			t.Fatalf("%s: nets %+v, unavailable %q", h.Name, s.Nets, s.NetsUnavailable)
		}
		n := s.Nets[0]
		out, _ := exec.Command(ipBin, "-n", ns, "-s", "link", "show", "dev", qd(h).TapDevice).CombinedOutput()
		if n.Name != qd(h).TapDevice || n.RxPackets < 2 || n.TxPackets < 2 || n.RxBytes < 300*2 || n.TxBytes < 300*2 {
			t.Errorf("%s: counters %+v; ip -s link shows:\n%s", h.Name, n, out)
		}
		t.Logf("%s: %+v", h.Name, n)
	}

	// Stop removes the tap device; Destroy of the other removes its too.
	if _, err := b.Stop(ctx, hs[0], 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := b.Destroy(ctx, hs[1]); err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		if out, err := exec.Command(ipBin, "-n", ns, "link", "show", "dev", qd(h).TapDevice).CombinedOutput(); err == nil {
			t.Errorf("tap %s still exists after stop/destroy: %s", qd(h).TapDevice, out)
		}
	}
}

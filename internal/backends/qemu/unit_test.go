package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/kdomanski/iso9660"

	"github.com/vmherd/vmherd/internal/imagechain"
	"github.com/vmherd/vmherd/internal/testenv/require"
)

var update = flag.Bool("update", false, "rewrite golden files")

func TestDetectAccel(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name     string
		kvm      bool
		flags    string
		modules  []string
		want     string
		whyParts string
	}{
		{"no /dev/kvm", false, "fpu vmx sse", []string{"kvm_intel"}, AccelTCG, "missing"},
		{"kvm_pvm: no vmx/svm", true, "fpu sse hypervisor", []string{"kvm", "kvm_pvm"}, AccelTCG, "neither vmx nor svm"},
		{"vmx without kvm_intel", true, "fpu vmx sse", []string{"kvm"}, AccelTCG, "kvm_intel is not loaded"},
		{"vmx with kvm_intel", true, "fpu vmx sse", []string{"kvm", "kvm_intel"}, AccelKVM, "kvm_intel"},
		{"svm with kvm_amd", true, "fpu svm sse", []string{"kvm", "kvm_amd"}, AccelKVM, "kvm_amd"},
		{"svm with kvm_intel only", true, "fpu svm", []string{"kvm_intel"}, AccelTCG, "kvm_amd is not loaded"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			root := t.TempDir()
			proc, sys, dev := filepath.Join(root, "proc"), filepath.Join(root, "sys"), filepath.Join(root, "dev", "kvm")
			must(t, os.MkdirAll(proc, 0o755))
			must(t, os.MkdirAll(filepath.Dir(dev), 0o755))
			must(t, os.WriteFile(filepath.Join(proc, "cpuinfo"), []byte("processor\t: 0\nflags\t\t: "+c.flags+"\n\nprocessor\t: 1\nflags\t\t: "+c.flags+"\n"), 0o644))
			for _, m := range c.modules {
				must(t, os.MkdirAll(filepath.Join(sys, "module", m), 0o755))
			}
			if c.kvm {
				must(t, os.WriteFile(dev, nil, 0o644))
			}
			got, why := detectAccel(proc, sys, dev)
			if got != c.want || !strings.Contains(why, c.whyParts) {
				t.Fatalf("detectAccel = %s (%s), want %s (%s)", got, why, c.want, c.whyParts)
			}
		})
	}
}

func TestMapStatus(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]api.VmState{
		"running": api.StateRunning, "paused": api.StateSuspended, "suspended": api.StateSuspended,
		"prelaunch": api.StateSuspended, "shutdown": api.StateStopped, "guest-panicked": api.StateFailed,
		"internal-error": api.StateFailed, "io-error": api.StateFailed, "inmigrate": api.StateRunning,
	} {
		if got := mapStatus(in); got != want {
			t.Errorf("mapStatus(%s) = %s, want %s", in, got, want)
		}
	}
}

func TestProcState(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	write := func(pid, stat, cmdline string) {
		must(t, os.MkdirAll(filepath.Join(root, pid), 0o755))
		must(t, os.WriteFile(filepath.Join(root, pid, "stat"), []byte(stat), 0o644))
		must(t, os.WriteFile(filepath.Join(root, pid, "cmdline"), []byte(cmdline), 0o644))
	}
	write("10", "10 (qemu-system-x86) S 1 10 10 0 -1", "qemu\x00-qmp\x00unix:/d/vms/a/qmp.sock,server=on\x00")
	write("11", "11 (odd) Z (name) Z 1 11", "")
	write("12", "12 (qemu) Z 1 12", "qemu\x00-qmp\x00unix:/d/vms/a/qmp.sock,server=on\x00")
	if !processAlive(root, 10) || processAlive(root, 11) || processAlive(root, 12) || processAlive(root, 13) {
		t.Fatal("processAlive: want 10 alive, 11/12 zombies, 13 absent")
	}
	if procState(root, 11) != "Z" {
		t.Fatalf("procState of a comm with parens = %q", procState(root, 11))
	}
	if !cmdlineHas(root, 10, "/d/vms/a/qmp.sock") || cmdlineHas(root, 10, "/d/vms/b/qmp.sock") {
		t.Fatal("cmdlineHas does not tell VMs apart")
	}
}

func TestNeighAndLeases(t *testing.T) {
	t.Parallel()
	neigh := []byte(`10.0.0.5 dev br0 lladdr 02:aa:bb:cc:dd:01 STALE
10.0.0.6 dev br0 lladdr 02:aa:bb:cc:dd:02 REACHABLE
10.0.0.7 dev br0 lladdr 02:aa:bb:cc:dd:03 FAILED
10.0.0.8 dev br0  INCOMPLETE
fe80::1 dev br0 lladdr 02:aa:bb:cc:dd:02 router STALE
`)
	for mac, want := range map[string]string{
		"02:aa:bb:cc:dd:01": "10.0.0.5", "02:AA:BB:CC:DD:02": "10.0.0.6", "02:aa:bb:cc:dd:03": "", "02:aa:bb:cc:dd:09": "",
	} {
		if got := neighIP(neigh, strings.ToLower(mac)); got != want {
			t.Errorf("neighIP(%s) = %q, want %q", mac, got, want)
		}
	}
	leases := []byte(`1700000000 02:aa:bb:cc:dd:01 10.0.0.50 a 01:02:aa:bb:cc:dd:01
1700000900 02:aa:bb:cc:dd:01 10.0.0.51 a *
1700000500 02:aa:bb:cc:dd:02 10.0.0.60 b *
`)
	if got := leaseIP(leases, "02:aa:bb:cc:dd:01"); got != "10.0.0.51" {
		t.Errorf("leaseIP picks %q, want the newest lease 10.0.0.51", got)
	}
	if got := leaseIP(leases, "02:aa:bb:cc:dd:02"); got != "10.0.0.60" {
		t.Errorf("leaseIP = %q", got)
	}
	if got := leaseIP(leases, "02:aa:bb:cc:dd:03"); got != "" {
		t.Errorf("leaseIP of an unknown MAC = %q", got)
	}
}

func TestTapNameAndMAC(t *testing.T) {
	t.Parallel()
	seen := map[string]bool{}
	for _, n := range []string{"a", "web1", "web2", strings.Repeat("x", 63), strings.Repeat("x", 62) + "y"} {
		tn := tapName(n, 0)
		if len(tn) > 15 || seen[tn] {
			t.Fatalf("tapName(%q) = %q: too long or not unique", n, tn)
		}
		seen[tn] = true
		mac := newMAC(n)
		if !strings.HasPrefix(mac, "02:") || len(mac) != 17 {
			t.Fatalf("newMAC = %q, want a locally administered MAC", mac)
		}
	}
}

func TestQEMUArgs(t *testing.T) {
	t.Parallel()
	spec := api.VmSpec{Name: "web1", MemoryMB: 256, Vcpus: 2, Network: &api.NetworkConfig{Type: api.NetworkUser}}
	r := &record{Handle: handle{VmHandle: api.VmHandle{Name: "web1", WorkDir: "/d/vms/web1", Spec: &spec},
		HandleData: HandleData{QMPSocket: "/d/vms/web1/qmp.sock", SerialSock: "/d/vms/web1/serial.sock", SerialLog: "/d/vms/web1/console.log",
			MAC: "02:01:02:03:04:05", SSHPort: 2222}},
		Chain: imagechain.Chain{{Path: "/img/top.qcow2", Format: "qcow2"}, {Path: "/img/base.raw", Format: "raw"}}}
	args := strings.Join(qemuArgs(r, AccelTCG), " ")
	for _, want := range []string{
		"-machine q35", "-accel tcg", "-cpu max", "-m 256", "-smp 2", "-daemonize", "-pidfile /d/vms/web1/qemu.pid",
		"-qmp unix:/d/vms/web1/qmp.sock,server=on,wait=off", "logfile=/d/vms/web1/console.log,logappend=on",
		"-vnc unix:/d/vms/web1/vnc.sock", "file=/d/vms/web1/seed.iso,media=cdrom,if=ide",
		// Every layer named with its format; the bottom one with no backing.
		`-blockdev {"driver":"raw","file":{"driver":"file","filename":"/img/base.raw","read-only":true},"node-name":"base1","read-only":true}`,
		`-blockdev {"backing":"base1","driver":"qcow2","file":{"driver":"file","filename":"/img/top.qcow2","read-only":true},"node-name":"base0","read-only":true}`,
		`-blockdev {"backing":"base0","discard":"unmap","driver":"qcow2","file":{"discard":"unmap","driver":"file","filename":"/d/vms/web1/disk.qcow2"},"node-name":"disk"}`,
		"-device virtio-blk-pci,drive=disk",
		"-netdev user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22", "virtio-net-pci,netdev=n0,mac=02:01:02:03:04:05", "-name guest=web1",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("qemu args lack %q:\n%s", want, args)
		}
	}
	spec.Network = &api.NetworkConfig{Type: api.NetworkTap, Bridge: "br0"}
	spec.UEFI = true
	r.Handle.TapDevice = "vhweb1-abc"
	r.Handle.Extra = map[string]string{ExtraOVMFCode: "/fw/CODE.fd", ExtraOVMFVars: "/d/vms/web1/OVMF_VARS.fd"}
	args = strings.Join(qemuArgs(r, AccelKVM), " ")
	for _, want := range []string{"-accel kvm", "-cpu host", "-netdev tap,id=n0,ifname=vhweb1-abc,script=no,downscript=no",
		"if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd", "if=pflash,format=raw,unit=1,file=/d/vms/web1/OVMF_VARS.fd"} {
		if !strings.Contains(args, want) {
			t.Errorf("qemu args lack %q:\n%s", want, args)
		}
	}
	spec.Network = &api.NetworkConfig{Type: api.NetworkNone}
	if args := qemuArgs(r, AccelTCG); !slices.Contains(args, "none") || slices.Contains(args, "-netdev") {
		t.Errorf("network none: %v", args)
	}
	if got := qopt("/a,b"); got != "/a,,b" {
		t.Errorf("qopt = %q", got)
	}
}

// TestSeedISO compares the seed's files, read back from the ISO, with a
// golden listing (go test -run TestSeedISO -update rewrites it).
func TestSeedISO(t *testing.T) {
	t.Parallel()
	specs := []api.VmSpec{
		{Name: "web1", SSH: &api.SshConfig{User: "vm", PublicKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample vm@host"}},
		{Name: "web2", CloudInit: &api.CloudInitConfig{InstanceID: "iid: odd #1", Hostname: "h2",
			UserData: "#cloud-config\nvmherd-ignore-acpi: true\n", NetworkConfig: "version: 2\nethernets: {}\n"}},
		{Name: "web3"},
	}
	var got strings.Builder
	for _, spec := range specs {
		path := filepath.Join(t.TempDir(), "seed.iso")
		must(t, writeSeedISO(path, spec))
		f, err := os.Open(path)
		must(t, err)
		img, err := iso9660.OpenImage(f)
		must(t, err)
		label, err := img.Label()
		must(t, err)
		root, err := img.RootDir()
		must(t, err)
		children, err := root.GetChildren()
		must(t, err)
		got.WriteString("== " + spec.Name + " (volume " + label + ")\n")
		for _, c := range children {
			b, err := io.ReadAll(c.Reader())
			must(t, err)
			got.WriteString("-- " + c.Name() + "\n" + string(b))
		}
		f.Close()
	}
	golden := filepath.Join("testdata", "seed.golden")
	if *update {
		must(t, os.MkdirAll("testdata", 0o755))
		must(t, os.WriteFile(golden, []byte(got.String()), 0o644))
	}
	want, err := os.ReadFile(golden)
	must(t, err)
	if got.String() != string(want) {
		t.Fatalf("seed ISO differs from %s (run with -update if intended):\n%s", golden, got.String())
	}
}

// fakeQMP serves one QMP connection: a banner, then a reply per command
// from replies (by command name), or nothing at all when silent.
func fakeQMP(t *testing.T, silent bool, replies map[string]string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "qmpt")
	must(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "qmp.sock")
	l, err := net.Listen("unix", path)
	must(t, err)
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if silent {
					_, _ = io.Copy(io.Discard, c)
					return
				}
				_, _ = io.WriteString(c, `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}`+"\n")
				// QEMU reads a JSON stream: commands need no newline.
				dec := json.NewDecoder(c)
				for {
					var cmd struct {
						Execute string `json:"execute"`
					}
					if err := dec.Decode(&cmd); err != nil {
						return
					}
					if cmd.Execute == "qmp_capabilities" {
						_, _ = io.WriteString(c, `{"return": {}}`+"\n")
						continue
					}
					reply, ok := replies[cmd.Execute]
					if !ok {
						continue // hang: never answer
					}
					// Once capabilities are negotiated, events come between replies.
					_, _ = io.WriteString(c, `{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "NOISE"}`+"\n")
					_, _ = io.WriteString(c, reply+"\n")
				}
			}()
		}
	}()
	return path
}

func TestQMPBoundedByContext(t *testing.T) {
	t.Parallel()
	t.Run("Status", func(t *testing.T) {
		path := fakeQMP(t, false, map[string]string{
			"query-status": `{"return": {"status": "paused", "singlestep": false, "running": false}}`,
			"query-vnc":    `{"return": {"enabled": true, "host": "127.0.0.1", "service": "5901", "family": "ipv4"}}`,
		})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := withQMP(ctx, path, func(m *monitor) error {
			st, err := m.status(ctx)
			if err != nil || st.Status != "paused" {
				t.Errorf("status = %+v, %v", st, err)
			}
			v, err := m.vnc(ctx)
			if err != nil || v != "127.0.0.1:5901" {
				t.Errorf("vnc = %q, %v", v, err)
			}
			return nil
		})
		must(t, err)
	})
	t.Run("VNCOnAUnixSocket", func(t *testing.T) {
		// What QEMU 7.2 answers for -vnc unix:PATH.
		path := fakeQMP(t, false, map[string]string{
			"query-vnc": `{"return": {"enabled": true, "auth": "none", "family": "unix", "clients": [], "service": "/d/vms/web1/vnc.sock", "host": ""}}`,
		})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		must(t, withQMP(ctx, path, func(m *monitor) error {
			if v, err := m.vnc(ctx); err != nil || v != "unix:/d/vms/web1/vnc.sock" {
				t.Errorf("vnc = %q, %v", v, err)
			}
			return nil
		}))
	})
	t.Run("SilentServer", func(t *testing.T) {
		path := fakeQMP(t, true, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := dialQMP(ctx, path)
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
			t.Fatalf("dialQMP to a silent server = %v after %v; want a deadline error at once", err, time.Since(start))
		}
	})
	t.Run("HungCommand", func(t *testing.T) {
		path := fakeQMP(t, false, map[string]string{})
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		err := withQMP(ctx, path, func(m *monitor) error {
			_, err := m.status(ctx)
			return err
		})
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
			t.Fatalf("hung query-status = %v after %v; want a deadline error", err, time.Since(start))
		}
	})
	t.Run("NoSocket", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		if _, err := dialQMP(ctx, filepath.Join(t.TempDir(), "none.sock")); err == nil {
			t.Fatal("dialQMP to a missing socket succeeded")
		}
	})
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestStartRetriesBusyForward: when QEMU itself finds the SSH forward port
// taken, Start retries with another port.
func TestStartRetriesBusyForward(t *testing.T) {
	t.Parallel()
	_, err := exec.LookPath("qemu-system-x86_64")
	require.Require(t, err == nil, "qemu-system-x86_64 not installed (apt-get install qemu-system-x86 qemu-utils)")
	dir, err := os.MkdirTemp("", "vmhu")
	must(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	base := filepath.Join(dir, "zero.raw")
	must(t, os.WriteFile(base, nil, 0o644))
	must(t, os.Truncate(base, 8<<20))
	b, err := New(Options{DataDir: dir, Accel: AccelTCG, DestroyStopTimeout: 100 * time.Millisecond})
	must(t, err)
	b.portFree = func(int) bool { return true } // let QEMU find out
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h, err := b.Prepare(ctx, api.VmSpec{Name: "busy", ImagePath: base, MemoryMB: 64})
	must(t, err)
	defer b.Destroy(context.Background(), h)
	l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(dataOf(h).SSHPort))
	must(t, err)
	defer l.Close()
	sh, err := b.Start(ctx, h)
	must(t, err)
	if dataOf(sh).SSHPort == dataOf(h).SSHPort || dataOf(sh).SSHPort == 0 {
		t.Fatalf("Start kept the busy port %d", dataOf(h).SSHPort)
	}
	if st, err := b.State(ctx, sh); err != nil || st != api.StateRunning {
		t.Fatalf("State = %s, %v", st, err)
	}
	// A second Start is a no-op: same PID, sockets untouched.
	again, err := b.Start(ctx, sh)
	if err != nil || again.PID != sh.PID {
		t.Fatalf("second Start = pid %d, %v; want pid %d", again.PID, err, sh.PID)
	}
	must(t, b.Destroy(ctx, sh))
}

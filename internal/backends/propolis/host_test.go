package propolis

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/propolis/fake"
	"github.com/vmherd/vmherd/internal/imagechain"
)

// recRunner records every command and models the bits of zfs, dladm and ps
// the host provisioner reads back. Spawned servers can be real fake
// propolis-servers listening on the address from their command line.
type recRunner struct {
	t *testing.T

	mu       sync.Mutex
	calls    []string
	datasets map[string]string // dataset -> vmherd:image
	vnics    map[string]string // vnic -> mac
	procs    map[int]string    // pid -> args
	servers  map[int]*fake.Server
	nextPID  int
	fail     map[string]error // command prefix -> error
	// serve starts a fake propolis-server for each spawned process.
	serve bool
}

func newRecRunner(t *testing.T) *recRunner {
	return &recRunner{t: t, datasets: map[string]string{}, vnics: map[string]string{}, procs: map[int]string{},
		servers: map[int]*fake.Server{}, nextPID: 4000, fail: map[string]error{}}
}

func (r *recRunner) Run(_ context.Context, name string, args ...string) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	cmd := strings.Join(append([]string{name}, args...), " ")
	if name != "ps" {
		r.calls = append(r.calls, cmd)
	}
	for prefix, err := range r.fail {
		if strings.HasPrefix(cmd, prefix) {
			return nil, err
		}
	}
	switch {
	case name == "ps":
		pid, _ := strconv.Atoi(args[len(args)-1])
		if a, ok := r.procs[pid]; ok {
			return []byte(a + "\n"), nil
		}
		return nil, errors.New("exit status 1")
	case strings.HasPrefix(cmd, "zfs list"):
		var out []string
		for ds := range r.datasets {
			out = append(out, ds)
		}
		slices.Sort(out)
		return []byte(strings.Join(out, "\n")), nil
	case strings.HasPrefix(cmd, "zfs create"):
		r.datasets[args[len(args)-1]] = "-"
	case strings.HasPrefix(cmd, "zfs get"):
		return []byte(r.datasets[args[len(args)-1]] + "\n"), nil
	case strings.HasPrefix(cmd, "zfs set"):
		k, v, _ := strings.Cut(args[1], "=")
		if k == imageProp {
			r.datasets[args[2]] = v
		}
	case strings.HasPrefix(cmd, "zfs destroy"):
		delete(r.datasets, args[1])
	case strings.HasPrefix(cmd, "dladm show-vnic"):
		var out []string
		for v, mac := range r.vnics {
			if strings.Contains(cmd, "macaddress") {
				out = append(out, v+":"+strings.ReplaceAll(mac, ":", `\:`))
			} else {
				out = append(out, v)
			}
		}
		return []byte(strings.Join(out, "\n")), nil
	case strings.HasPrefix(cmd, "dladm create-vnic"):
		r.vnics[args[len(args)-1]] = args[len(args)-2]
	case strings.HasPrefix(cmd, "dladm delete-vnic"):
		delete(r.vnics, args[len(args)-1])
	case name == "qemu-img" && args[0] == "info":
		return []byte(`{"virtual-size": 10737418240, "format": "qcow2"}`), nil
	case name == "arp":
		return []byte("Net to Media Table: IPv4\nDevice   IP Address               Mask      Flags      Phys Addr\n" +
			"------ -------------------- --------------- -------- ---------------\n" +
			"vnic0  192.168.7.23         255.255.255.255          2:8:20:a:b:c\n"), nil
	}
	return nil, nil
}

func (r *recRunner) Spawn(logPath, name string, args ...string) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	cmd := strings.Join(append([]string{name}, args...), " ")
	r.calls = append(r.calls, "spawn "+cmd)
	if err := r.fail["spawn"]; err != nil {
		return 0, err
	}
	r.nextPID++
	pid := r.nextPID
	r.procs[pid] = "/opt/propolis/" + cmd
	if r.serve {
		f, err := fake.New(fake.Options{Listen: args[len(args)-1]})
		if err != nil {
			return 0, err
		}
		r.servers[pid] = f
	}
	_ = os.WriteFile(logPath, []byte("propolis-server: listening on "+args[len(args)-1]+"\n"), 0o644)
	return pid, nil
}

func (r *recRunner) Signal(pid int, sig syscall.Signal) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, fmt.Sprintf("kill -%d %d", sig, pid))
	delete(r.procs, pid)
	if f := r.servers[pid]; f != nil {
		f.CheckRequests(r.t)
		f.Close()
		delete(r.servers, pid)
	}
	return nil
}

// take returns the calls since the last take.
func (r *recRunner) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.calls
	r.calls = nil
	return c
}

func (r *recRunner) crash(pid int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.procs, pid)
	if f := r.servers[pid]; f != nil {
		f.Kill()
	}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func testHost(t *testing.T, r *recRunner) (*host, HostOptions) {
	t.Helper()
	o := HostOptions{
		ServerBin: "/opt/propolis/propolis-server", Bootrom: "/opt/propolis/OVMF_CODE.fd",
		ZvolParent: "rpool/vmherd", Link: "igb0", StateDir: t.TempDir(),
		PortBase: freePort(t), PortCount: 20, ReadyTimeout: 5 * time.Second,
	}
	h, err := newHost(o, r)
	if err != nil {
		t.Fatal(err)
	}
	if !r.serve {
		h.ready = func(context.Context, string, int) error { return nil }
	}
	t.Cleanup(func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, f := range r.servers {
			f.Close()
		}
	})
	return h, h.o
}

func rawImage(t *testing.T, size int) string {
	p := filepath.Join(t.TempDir(), "base.raw")
	if err := os.WriteFile(p, make([]byte, size), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func wantCalls(t *testing.T, got []string, want ...string) {
	t.Helper()
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("commands:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

func TestHostProvisionAndRelease(t *testing.T) {
	r := newRecRunner(t)
	h, o := testHost(t, r)
	ctx := context.Background()
	img := rawImage(t, 3<<20+1)
	spec := api.VmSpec{Name: "web1", ImagePath: img, Network: &api.NetworkConfig{Type: api.NetworkVnic, Name: "vnic0"}}
	p, err := h.Provision(ctx, "web1", spec)
	if err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(o.PortBase)
	mac := macFor("web1")
	wantCalls(t, r.take(),
		"zfs list -H -o name -r -d 1 rpool/vmherd",
		"zfs create -p -V 4194304 rpool/vmherd/web1", // the image rounded up to whole MiB
		"dd if="+img+" of=/dev/zvol/rdsk/rpool/vmherd/web1 bs=1048576",
		"zfs set vmherd:image="+img+" rpool/vmherd/web1",
		"dladm show-vnic -p -o link,macaddress",
		"dladm create-vnic -t -l igb0 -m "+mac+" vnic0",
		"spawn /opt/propolis/propolis-server run /opt/propolis/OVMF_CODE.fd "+addr,
	)
	if p.Endpoint != addr || p.DiskPath != "/dev/zvol/rdsk/rpool/vmherd/web1" || p.VNIC != "vnic0" || p.MAC != mac || p.PID == 0 {
		t.Fatalf("placement %+v", p)
	}
	// Again: everything is there and the server runs, so nothing is done.
	p2, err := h.Provision(ctx, "web1", spec)
	if err != nil || p2.Endpoint != p.Endpoint || p2.PID != p.PID {
		t.Fatalf("second Provision %+v %v", p2, err)
	}
	wantCalls(t, r.take())
	// A restarted worker finds the placement and its port taken.
	h2, err := newHost(o, r)
	if err != nil {
		t.Fatal(err)
	}
	if h2.ports[o.PortBase] != "web1" {
		t.Fatalf("ports after restart %v", h2.ports)
	}
	if ip, err := h.GuestIP(ctx, "web1", Placement{MAC: "02:08:20:0a:0b:0c"}); err != nil || ip != "192.168.7.23" {
		t.Fatalf("GuestIP %q %v", ip, err)
	}
	r.take()
	if err := h.Release(ctx, "web1", p); err != nil {
		t.Fatal(err)
	}
	wantCalls(t, r.take(),
		fmt.Sprintf("kill -%d %d", syscall.SIGTERM, p.PID),
		"dladm show-vnic -p -o link",
		"dladm delete-vnic -t vnic0",
		"zfs list -H -o name -r -d 1 rpool/vmherd",
		"zfs destroy rpool/vmherd/web1",
	)
	if err := h.Release(ctx, "web1", p); err != nil {
		t.Fatal(err)
	}
	wantCalls(t, r.take(), "dladm show-vnic -p -o link", "zfs list -H -o name -r -d 1 rpool/vmherd")
	if _, err := os.Stat(h.statePath("web1")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("state file left: %v", err)
	}
}

func TestHostQcow2ExistingVNIC(t *testing.T) {
	r := newRecRunner(t)
	r.vnics["net7"] = "2:8:20:1:2:3"
	h, o := testHost(t, r)
	img := filepath.Join(t.TempDir(), "base.qcow2")
	_ = os.WriteFile(img, qcow2Header(""), 0o644)
	p, err := h.Provision(context.Background(), "db", api.VmSpec{Name: "db", ImagePath: img, DiskGB: 20,
		Network: &api.NetworkConfig{Type: api.NetworkVnic, Name: "net7"}})
	if err != nil {
		t.Fatal(err)
	}
	wantCalls(t, r.take(),
		"zfs list -H -o name -r -d 1 rpool/vmherd",
		"qemu-img info --output=json -f qcow2 "+img,
		"zfs create -p -V 21474836480 rpool/vmherd/db", // disk_gb beats the 10 GiB image
		"qemu-img convert -n -f qcow2 -O raw "+img+" /dev/zvol/rdsk/rpool/vmherd/db",
		"zfs set vmherd:image="+img+" rpool/vmherd/db",
		"dladm show-vnic -p -o link,macaddress",
		"spawn /opt/propolis/propolis-server run /opt/propolis/OVMF_CODE.fd 127.0.0.1:"+strconv.Itoa(o.PortBase),
	)
	if p.MAC != "2:8:20:1:2:3" || p.Extra[hxVNICCreated] != "" {
		t.Fatalf("an existing VNIC is used, not owned: %+v", p)
	}
	// Releasing leaves a VNIC vmherd did not make.
	if err := h.Release(context.Background(), "db", p); err != nil {
		t.Fatal(err)
	}
	if _, ok := r.vnics["net7"]; !ok {
		t.Fatal("released a VNIC vmherd did not create")
	}
}

// A server that does not come up: everything made is removed, and the
// error shows the end of its log.
func TestHostRollback(t *testing.T) {
	r := newRecRunner(t)
	h, _ := testHost(t, r)
	h.ready = func(context.Context, string, int) error { return errors.New("no answer") }
	img := rawImage(t, 1<<20)
	_, err := h.Provision(context.Background(), "bad", api.VmSpec{Name: "bad", ImagePath: img, Network: &api.NetworkConfig{Type: api.NetworkUser}})
	if err == nil || !strings.Contains(err.Error(), "did not come up") || !strings.Contains(err.Error(), "listening on") {
		t.Fatalf("Provision = %v", err)
	}
	if len(r.datasets) != 0 || len(r.vnics) != 0 || len(r.procs) != 0 || len(h.ports) != 0 {
		t.Fatalf("left behind: datasets %v vnics %v procs %v ports %v", r.datasets, r.vnics, r.procs, h.ports)
	}
	// A VNIC that cannot be made, and no link: a clear error, nothing left.
	h.o.Link = ""
	h.ready = func(context.Context, string, int) error { return nil }
	_, err = h.Provision(context.Background(), "bad", api.VmSpec{Name: "bad", ImagePath: img, Network: &api.NetworkConfig{Type: api.NetworkVnic, Name: "nope0"}})
	if !errors.Is(err, api.ErrInvalid) || !strings.Contains(err.Error(), "nope0") || len(r.datasets) != 0 {
		t.Fatalf("Provision without a link = %v (datasets %v)", err, r.datasets)
	}
	// A failing import destroys the new zvol.
	r.fail["dd "] = errors.New("dd: write error: No space left on device")
	_, err = h.Provision(context.Background(), "bad", api.VmSpec{Name: "bad", ImagePath: img})
	if err == nil || !strings.Contains(err.Error(), "No space left") || len(r.datasets) != 0 {
		t.Fatalf("Provision with a failing import = %v (datasets %v)", err, r.datasets)
	}
}

func TestHostPorts(t *testing.T) {
	r := newRecRunner(t)
	h, o := testHost(t, r)
	busy := "127.0.0.1:" + strconv.Itoa(o.PortBase+1)
	h.listening = func(addr string) bool { return addr == busy }
	img := rawImage(t, 1<<20)
	var ports []int
	for _, n := range []string{"a", "b", "c"} {
		p, err := h.Provision(context.Background(), n, api.VmSpec{Name: n, ImagePath: img})
		if err != nil {
			t.Fatal(err)
		}
		ports = append(ports, portOf(p.Endpoint))
	}
	if want := []int{o.PortBase, o.PortBase + 2, o.PortBase + 3}; !slices.Equal(ports, want) {
		t.Fatalf("ports %v, want %v (one taken by another program)", ports, want)
	}
}

// The whole backend over host provisioning, with each spawned server a fake
// propolis-server on the address from its command line: prepare starts
// the server, a crashed server is restarted by start, destroy cleans up.
func TestBackendOnHost(t *testing.T) {
	r := newRecRunner(t)
	r.serve = true
	h, o := testHost(t, r)
	b, err := New(Options{Provisioner: h, Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	img := rawImage(t, 1<<20)
	hd, err := b.Prepare(ctx, api.VmSpec{Name: "web1", ImagePath: img, Vcpus: 2, MemoryMB: 256, Network: &api.NetworkConfig{Type: api.NetworkUser}})
	if err != nil {
		t.Fatal(err)
	}
	if dataOf(hd).Endpoint != "127.0.0.1:"+strconv.Itoa(o.PortBase) || hd.PID == 0 || dataOf(hd).Extra[extraVNIC] != vnicFor("web1") {
		t.Fatalf("handle %+v", hd)
	}
	if hd, err = b.Start(ctx, hd); err != nil {
		t.Fatal(err)
	}
	if st, _ := b.State(ctx, hd); st != api.StateRunning {
		t.Fatalf("state %s", st)
	}
	// The server crashes: the VM reads as stopped, and start brings a new
	// server up on the same address.
	r.crash(hd.PID)
	if st, err := b.State(ctx, hd); err != nil || st != api.StateStopped {
		t.Fatalf("state after crash %s %v", st, err)
	}
	old := hd.PID
	if hd, err = b.Start(ctx, hd); err != nil {
		t.Fatal(err)
	}
	if hd.PID == old || dataOf(hd).Endpoint != "127.0.0.1:"+strconv.Itoa(o.PortBase) {
		t.Fatalf("restarted handle %+v", hd)
	}
	if err := b.Destroy(ctx, hd); err != nil {
		t.Fatal(err)
	}
	if len(r.datasets) != 0 || len(r.vnics) != 0 || len(r.procs) != 0 {
		t.Fatalf("left behind: datasets %v vnics %v procs %v", r.datasets, r.vnics, r.procs)
	}
}

func TestArpLookup(t *testing.T) {
	out := "vnic1  10.0.0.9   255.255.255.255  SPLA  2:8:20:ff:0:1\nvnic2 10.0.0.10 255.255.255.255 02:08:20:ff:00:02\n"
	if got := arpLookup(out, "02:08:20:ff:00:01"); got != "10.0.0.9" {
		t.Fatal(got)
	}
	if got := arpLookup(out, "2:8:20:ff:0:2"); got != "10.0.0.10" {
		t.Fatal(got)
	}
	if got := arpLookup(out, "02:08:20:ff:00:03"); got != "" {
		t.Fatal(got)
	}
}

func TestHostOptions(t *testing.T) {
	_, err := newHost(HostOptions{}, newRecRunner(t))
	if err == nil || !strings.Contains(err.Error(), "--propolis-bootrom") || !strings.Contains(err.Error(), "--propolis-zvol-parent") {
		t.Fatalf("newHost without options = %v", err)
	}
}

// A zvol an earlier attempt made and imported is reused as it is.
func TestHostReusesImportedZvol(t *testing.T) {
	r := newRecRunner(t)
	h, _ := testHost(t, r)
	img := rawImage(t, 1<<20)
	r.datasets["rpool/vmherd/web1"] = img
	if _, err := h.Provision(context.Background(), "web1", api.VmSpec{Name: "web1", ImagePath: img}); err != nil {
		t.Fatal(err)
	}
	for _, c := range r.take() {
		if strings.HasPrefix(c, "zfs create") || strings.HasPrefix(c, "dd ") {
			t.Fatalf("re-imported an imported zvol: %s", c)
		}
	}
}

// qcow2Header is the first 512 bytes of a qcow2 v3 image, with a backing
// file name when backing is not "".
func qcow2Header(backing string) []byte {
	b := make([]byte, 512)
	copy(b, "QFI\xfb")
	binary.BigEndian.PutUint32(b[4:], 3)
	binary.BigEndian.PutUint32(b[100:], 104)
	if backing != "" {
		binary.BigEndian.PutUint64(b[8:], 256)
		binary.BigEndian.PutUint32(b[16:], uint32(len(backing)))
		copy(b[256:], backing)
	}
	return b
}

// A qcow2 that names a backing file is refused before qemu-img convert
// (root) could copy that file into the guest's disk (issue #22, item 1).
func TestHostQcow2WithBackingFile(t *testing.T) {
	r := newRecRunner(t)
	h, _ := testHost(t, r)
	img := filepath.Join(t.TempDir(), "evil.qcow2")
	_ = os.WriteFile(img, qcow2Header("/etc/shadow"), 0o644)
	_, err := h.Provision(context.Background(), "evil", api.VmSpec{Name: "evil", ImagePath: img,
		Network: &api.NetworkConfig{Type: api.NetworkVnic, Name: "net7"}})
	if !errors.Is(err, imagechain.ErrRefused) || !strings.Contains(err.Error(), `backing file "/etc/shadow"`) {
		t.Fatalf("Provision over a qcow2 with a backing file: %v", err)
	}
	for _, c := range r.take() {
		if strings.HasPrefix(c, "qemu-img") || strings.HasPrefix(c, "zfs create") {
			t.Errorf("ran %q for a refused image", c)
		}
	}
}

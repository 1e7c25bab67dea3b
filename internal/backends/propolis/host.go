package propolis

import (
	"bytes"
	"context"
	"crypto/sha1"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
	"github.com/vmherd/vmherd/internal/imagechain"
)

// Runner runs host commands. The illumos implementation uses os/exec; tests
// use a recording fake, so the host logic is tested on every platform.
type Runner interface {
	// Run runs a command to completion and returns its standard output. A
	// non-zero exit is an error that carries the command's standard error.
	Run(ctx context.Context, name string, args ...string) ([]byte, error)
	// Spawn starts a long-running process in its own process group, with
	// its output appended to logPath; it outlives the worker.
	Spawn(logPath, name string, args ...string) (pid int, err error)
	// Signal sends sig to pid.
	Signal(pid int, sig syscall.Signal) error
}

// ErrNeedsIllumos: host-side provisioning (zvols, VNICs, propolis-server
// processes) only exists on illumos.
var ErrNeedsIllumos = errors.New("propolis host-side provisioning needs illumos (zfs, dladm, bhyve); on this system use an already-running propolis-server (--propolis-server ADDR)")

// HostOptions configure host provisioning on illumos.
type HostOptions struct {
	// ServerBin is the propolis-server binary (default "propolis-server").
	ServerBin string
	// Bootrom is the UEFI firmware (OVMF) the servers boot guests with.
	Bootrom string
	// ZvolParent is the dataset under which each VM's boot disk zvol is
	// made, e.g. "rpool/vmherd" (created if missing).
	ZvolParent string
	// Link is the physical link VNICs are created over when a spec names a
	// VNIC that does not exist (or asks for "user" networking).
	Link string
	// ListenIP is the address servers listen on; it must be reachable from
	// the worker (default 127.0.0.1: servers run in the worker's zone).
	ListenIP string
	// PortBase and PortCount give the range of server ports (default
	// 12400, 200 ports).
	PortBase  int
	PortCount int
	// StateDir keeps each VM's placement and server log (required), e.g.
	// <data-dir>/propolis.
	StateDir string
	// ReadyTimeout bounds a server's start-up (default 30s).
	ReadyTimeout time.Duration
	// ImportTimeout bounds writing the image into the zvol (default 30m).
	ImportTimeout time.Duration
}

// Keys of Placement.Extra for host provisioning.
const (
	hxZvol        = "zvol"
	hxVNICCreated = "vnic_created"
	hxLog         = "log"
)

// host provisions zvols, VNICs and one propolis-server per VM.
type host struct {
	o   HostOptions
	run Runner
	// ready waits until the server at addr (process pid) answers; tests
	// replace it.
	ready func(ctx context.Context, addr string, pid int) error
	// listening probes whether something accepts connections at addr.
	listening func(addr string) bool

	mu    sync.Mutex
	ports map[int]string // port -> vm name
}

var _ Provisioner = (*host)(nil)

// newHost checks the options and loads the placements left by an earlier
// worker from StateDir.
func newHost(o HostOptions, r Runner) (*host, error) {
	if o.ServerBin == "" {
		o.ServerBin = "propolis-server"
	}
	if o.ListenIP == "" {
		o.ListenIP = "127.0.0.1"
	}
	if o.PortBase == 0 {
		o.PortBase = 12400
	}
	if o.PortCount == 0 {
		o.PortCount = 200
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 30 * time.Second
	}
	if o.ImportTimeout == 0 {
		o.ImportTimeout = 30 * time.Minute
	}
	var missing []string
	if o.Bootrom == "" {
		missing = append(missing, "--propolis-bootrom (the OVMF firmware)")
	}
	if o.ZvolParent == "" {
		missing = append(missing, "--propolis-zvol-parent (the dataset for boot disks)")
	}
	if o.StateDir == "" {
		missing = append(missing, "a state directory")
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("propolis host provisioning needs %s", strings.Join(missing, ", "))
	}
	if net.ParseIP(o.ListenIP) == nil {
		return nil, fmt.Errorf("propolis host provisioning: listen address %q is not an IP address", o.ListenIP)
	}
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("propolis host provisioning: %w", err)
	}
	h := &host{o: o, run: r, ports: map[int]string{}, listening: tcpListening}
	h.ready = h.waitReady
	entries, err := os.ReadDir(o.StateDir)
	if err != nil {
		return nil, fmt.Errorf("propolis host provisioning: %w", err)
	}
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		if p, err := h.load(name); err == nil && p != nil {
			h.ports[portOf(p.Endpoint)] = name
		}
	}
	return h, nil
}

func tcpListening(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return false
	}
	_ = c.Close()
	return true
}

func (h *host) statePath(name string) string { return filepath.Join(h.o.StateDir, name+".json") }
func (h *host) logPath(name string) string   { return filepath.Join(h.o.StateDir, name+".log") }
func (h *host) dataset(name string) string   { return h.o.ZvolParent + "/" + name }

// zvolDevice is the raw device propolis opens for a zvol.
func zvolDevice(dataset string) string { return "/dev/zvol/rdsk/" + dataset }

func (h *host) load(name string) (*Placement, error) {
	b, err := os.ReadFile(h.statePath(name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var p Placement
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("reading %s: %w", h.statePath(name), err)
	}
	return &p, nil
}

func (h *host) save(name string, p Placement) error {
	b, _ := json.MarshalIndent(p, "", "  ")
	tmp := h.statePath(name) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, h.statePath(name))
}

// Provision makes the VM's zvol (from its image) and VNIC, and starts its
// propolis-server. A second call for the same VM returns what the first
// made. On failure, whatever this call made is removed again.
func (h *host) Provision(ctx context.Context, name string, spec api.VmSpec) (p Placement, err error) {
	prev, err := h.load(name)
	if err != nil {
		return Placement{}, err
	}
	if prev != nil && h.alive(ctx, *prev) {
		return *prev, nil
	}
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()
	cleanup := context.WithoutCancel(ctx)
	p = Placement{Extra: map[string]string{}}

	ds := h.dataset(name)
	made, err := h.makeZvol(ctx, ds, spec)
	if err != nil {
		return p, err
	}
	if made {
		undo = append(undo, func() { _, _ = h.run.Run(cleanup, "zfs", "destroy", ds) })
	}
	p.DiskPath = zvolDevice(ds)
	p.Extra[hxZvol] = ds

	vnic, mac, created, err := h.makeVNIC(ctx, name, spec)
	if err != nil {
		return p, err
	}
	p.VNIC, p.MAC = vnic, mac
	if prev != nil && prev.VNIC == vnic && prev.Extra[hxVNICCreated] == "true" {
		created = true // an earlier attempt made it
	}
	if created {
		p.Extra[hxVNICCreated] = "true"
		undo = append(undo, func() { _, _ = h.run.Run(cleanup, "dladm", "delete-vnic", "-t", vnic) })
	}

	port, err := h.allocPort(name)
	if err != nil {
		return p, err
	}
	undo = append(undo, func() { h.freePort(port, name) })
	p.Endpoint = net.JoinHostPort(h.o.ListenIP, strconv.Itoa(port))
	p.Extra[hxLog] = h.logPath(name)
	if p, err = h.startServer(ctx, name, p); err != nil {
		return p, err
	}
	undo = append(undo, func() { h.kill(cleanup, p) })
	if err := h.save(name, p); err != nil {
		return p, fmt.Errorf("recording the placement of vm %s: %w", name, err)
	}
	return p, nil
}

// makeZvol creates the VM's zvol and writes the image into it, unless a
// zvol already holds that image. It reports whether it created the zvol.
func (h *host) makeZvol(ctx context.Context, ds string, spec api.VmSpec) (bool, error) {
	if spec.ImagePath == "" {
		return false, fmt.Errorf("%w: spec.image_path: the propolis backend needs a boot disk image", api.ErrInvalid)
	}
	exists, err := h.datasetExists(ctx, ds)
	if err != nil {
		return false, err
	}
	if exists {
		out, err := h.run.Run(ctx, "zfs", "get", "-H", "-o", "value", imageProp, ds)
		if err != nil {
			return false, fmt.Errorf("reading %s of zvol %s: %w", imageProp, ds, err)
		}
		if strings.TrimSpace(string(out)) == spec.ImagePath {
			return false, nil // made and imported by an earlier attempt
		}
	}
	format, size, err := h.imageInfo(ctx, spec.ImagePath)
	if err != nil {
		return false, err
	}
	if want := int64(spec.DiskGB) << 30; want > size {
		size = want
	}
	size = (size + 1<<20 - 1) &^ (1<<20 - 1) // whole MiB
	made := false
	if !exists {
		if _, err := h.run.Run(ctx, "zfs", "create", "-p", "-V", strconv.FormatInt(size, 10), ds); err != nil {
			return false, fmt.Errorf("creating zvol %s for the boot disk: %w", ds, err)
		}
		made = true
	}
	ictx, cancel := context.WithTimeout(ctx, h.o.ImportTimeout)
	defer cancel()
	dev := zvolDevice(ds)
	var ierr error
	if format == "qcow2" {
		_, ierr = h.run.Run(ictx, "qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", spec.ImagePath, dev)
	} else {
		_, ierr = h.run.Run(ictx, "dd", "if="+spec.ImagePath, "of="+dev, "bs=1048576")
	}
	if ierr == nil {
		_, ierr = h.run.Run(ctx, "zfs", "set", imageProp+"="+spec.ImagePath, ds)
	}
	if ierr != nil {
		if made {
			_, _ = h.run.Run(context.WithoutCancel(ctx), "zfs", "destroy", ds)
		}
		return false, fmt.Errorf("importing image %s into zvol %s: %w", spec.ImagePath, ds, ierr)
	}
	return made, nil
}

// imageProp is the zvol's user property naming the image it was made from.
const imageProp = "vmherd:image"

func (h *host) datasetExists(ctx context.Context, ds string) (bool, error) {
	parent := ds[:strings.LastIndexByte(ds, '/')]
	out, err := h.run.Run(ctx, "zfs", "list", "-H", "-o", "name", "-r", "-d", "1", parent)
	if err != nil {
		return false, nil // no parent yet: zfs create -p makes it
	}
	return slices.Contains(strings.Fields(string(out)), ds), nil
}

// imageInfo returns an image's format (raw or qcow2) and virtual size.
func (h *host) imageInfo(ctx context.Context, path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, fmt.Errorf("%w: spec.image_path: %v", api.ErrInvalid, err)
	}
	defer f.Close()
	magic := make([]byte, 4)
	if _, err := io.ReadFull(f, magic); err == nil && bytes.Equal(magic, []byte("QFI\xfb")) {
		// qemu-img convert (root) would copy a backing file or an
		// external data file into the guest's disk: the image must name
		// no other file, and its format is pinned.
		if _, err := (imagechain.Policy{HeaderOnly: true, SelfContained: true}).Inspect(ctx, path, "qcow2"); err != nil {
			return "", 0, fmt.Errorf("%w: spec.image_path: %w", api.ErrInvalid, err)
		}
		out, err := h.run.Run(ctx, "qemu-img", "info", "--output=json", "-f", "qcow2", path)
		if err != nil {
			return "", 0, fmt.Errorf("reading the size of qcow2 image %s: %w", path, err)
		}
		var info struct {
			VirtualSize int64 `json:"virtual-size"`
		}
		if err := json.Unmarshal(out, &info); err != nil || info.VirtualSize <= 0 {
			return "", 0, fmt.Errorf("reading the size of qcow2 image %s: unexpected qemu-img output", path)
		}
		return "qcow2", info.VirtualSize, nil
	}
	st, err := f.Stat()
	if err != nil {
		return "", 0, err
	}
	return "raw", st.Size(), nil
}

// vnicNameRE is what dladm accepts as a link name (ending in a digit).
var vnicNameRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,29}[0-9]$`)

// vnicFor names the VNIC vmherd creates for a VM that asks for none by name.
func vnicFor(name string) string {
	sum := sha1.Sum([]byte(name))
	return fmt.Sprintf("vmh%x0", sum[:5])
}

// macFor derives a locally administered unicast MAC for a VM's VNIC.
func macFor(name string) string {
	sum := sha1.Sum([]byte("mac/" + name))
	return fmt.Sprintf("02:%02x:%02x:%02x:%02x:%02x", sum[0], sum[1], sum[2], sum[3], sum[4])
}

// makeVNIC returns the VM's VNIC and MAC, creating the VNIC when needed.
func (h *host) makeVNIC(ctx context.Context, name string, spec api.VmSpec) (vnic, mac string, created bool, err error) {
	n := spec.Network
	if n == nil || n.Type == api.NetworkNone {
		return "", "", false, nil
	}
	link := h.o.Link
	switch n.Type {
	case api.NetworkVnic:
		vnic = n.Name
		if n.Link != "" {
			link = n.Link
		}
	case api.NetworkUser:
	default:
		return "", "", false, fmt.Errorf("%w: spec.network.type: %q networking does not exist on propolis; use vnic or none", api.ErrInvalid, n.Type)
	}
	// A VNIC vmherd names is vmherd's own, even if an earlier attempt made it.
	ours := vnic == ""
	if ours {
		vnic = vnicFor(name)
	}
	if !vnicNameRE.MatchString(vnic) {
		return "", "", false, fmt.Errorf("%w: spec.network.name: %q is not a valid VNIC name (letters, digits, '_', ending in a digit, at most 31)", api.ErrInvalid, vnic)
	}
	out, err := h.run.Run(ctx, "dladm", "show-vnic", "-p", "-o", "link,macaddress")
	if err != nil {
		return "", "", false, fmt.Errorf("listing VNICs: %w", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		l, m, ok := strings.Cut(strings.TrimSpace(line), ":")
		if ok && l == vnic {
			return vnic, strings.ReplaceAll(m, `\:`, ":"), ours, nil
		}
	}
	if link == "" {
		return "", "", false, fmt.Errorf("%w: spec.network: VNIC %s does not exist and no link is configured to create it over; create it (dladm create-vnic -l <link> %s), or set spec.network.link or --propolis-link", api.ErrInvalid, vnic, vnic)
	}
	mac = macFor(name)
	if _, err := h.run.Run(ctx, "dladm", "create-vnic", "-t", "-l", link, "-m", mac, vnic); err != nil {
		return "", "", false, fmt.Errorf("creating VNIC %s over %s: %w", vnic, link, err)
	}
	return vnic, mac, true, nil
}

// allocPort picks a free server port and reserves it for the VM.
func (h *host) allocPort(name string) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for port, owner := range h.ports {
		if owner == name {
			return port, nil
		}
	}
	for port := h.o.PortBase; port < h.o.PortBase+h.o.PortCount; port++ {
		if _, taken := h.ports[port]; taken {
			continue
		}
		if h.listening(net.JoinHostPort(h.o.ListenIP, strconv.Itoa(port))) {
			continue
		}
		h.ports[port] = name
		return port, nil
	}
	return 0, fmt.Errorf("no free propolis-server port in %d-%d on %s; destroy VMs or widen the port range", h.o.PortBase, h.o.PortBase+h.o.PortCount-1, h.o.ListenIP)
}

func (h *host) freePort(port int, name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ports[port] == name {
		delete(h.ports, port)
	}
}

// startServer runs `propolis-server run <bootrom> <ip:port>` and waits
// until it answers.
func (h *host) startServer(ctx context.Context, name string, p Placement) (Placement, error) {
	pid, err := h.run.Spawn(p.Extra[hxLog], h.o.ServerBin, "run", h.o.Bootrom, p.Endpoint)
	if err != nil {
		return p, fmt.Errorf("starting propolis-server for vm %s: %w", name, err)
	}
	p.PID = pid
	rctx, cancel := context.WithTimeout(ctx, h.o.ReadyTimeout)
	defer cancel()
	if err := h.ready(rctx, p.Endpoint, pid); err != nil {
		h.kill(context.WithoutCancel(ctx), p)
		return p, fmt.Errorf("propolis-server for vm %s at %s did not come up: %w%s", name, p.Endpoint, err, logTail(p.Extra[hxLog]))
	}
	return p, nil
}

// waitReady polls GET /instance until the server answers it (200, or 424
// before the first ensure) or its process is gone.
func (h *host) waitReady(ctx context.Context, addr string, pid int) error {
	c := papi.New(addr, papi.WithTimeout(2*time.Second))
	for {
		_, err := c.Get(ctx)
		if err == nil || errors.Is(err, papi.ErrNoInstance) {
			return nil
		}
		if !h.pidAlive(ctx, pid, addr) {
			return fmt.Errorf("the process (pid %d) exited", pid)
		}
		t := time.NewTimer(100 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-t.C:
		}
	}
}

// logTail returns the end of a server log, for error messages.
func logTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return "; its log " + path + " ends with:\n" + strings.TrimSpace(string(b))
}

// pidAlive reports whether pid is the propolis-server serving addr.
func (h *host) pidAlive(ctx context.Context, pid int, addr string) bool {
	if pid <= 0 {
		return false
	}
	out, err := h.run.Run(ctx, "ps", "-o", "args=", "-p", strconv.Itoa(pid))
	if err != nil {
		return false
	}
	args := string(out)
	return strings.Contains(args, filepath.Base(h.o.ServerBin)) && strings.Contains(args, addr)
}

func (h *host) alive(ctx context.Context, p Placement) bool {
	return h.pidAlive(ctx, p.PID, p.Endpoint)
}

// kill stops a VM's server: SIGTERM, then SIGKILL after 5s.
func (h *host) kill(ctx context.Context, p Placement) {
	if !h.alive(ctx, p) {
		return
	}
	_ = h.run.Signal(p.PID, syscall.SIGTERM)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if !h.alive(ctx, p) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	_ = h.run.Signal(p.PID, syscall.SIGKILL)
}

// Ensure restarts the VM's server if it is not running (after a crash or a
// host reboot), on the same address.
func (h *host) Ensure(ctx context.Context, name string, p Placement) (Placement, error) {
	if h.alive(ctx, p) {
		return p, nil
	}
	if p.Extra == nil {
		p.Extra = map[string]string{}
	}
	if p.Extra[hxLog] == "" {
		p.Extra[hxLog] = h.logPath(name)
	}
	h.mu.Lock()
	h.ports[portOf(p.Endpoint)] = name
	h.mu.Unlock()
	p, err := h.startServer(ctx, name, p)
	if err != nil {
		return p, err
	}
	if err := h.save(name, p); err != nil {
		return p, fmt.Errorf("recording the placement of vm %s: %w", name, err)
	}
	return p, nil
}

// Adopt reserves the VM's port again.
func (h *host) Adopt(_ context.Context, name string, p Placement) (Placement, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	port := portOf(p.Endpoint)
	if o, ok := h.ports[port]; ok && o != name {
		return p, fmt.Errorf("port %d is already given to vm %s", port, o)
	}
	h.ports[port] = name
	return p, nil
}

// Gone: the VM's server process is not running.
func (h *host) Gone(ctx context.Context, _ string, p Placement) bool { return !h.alive(ctx, p) }

// Release kills the VM's server and removes the VNIC (if vmherd made it)
// and the zvol. Missing pieces are skipped.
func (h *host) Release(ctx context.Context, name string, p Placement) error {
	h.kill(ctx, p)
	var errs []error
	if p.VNIC != "" && p.Extra[hxVNICCreated] == "true" {
		out, err := h.run.Run(ctx, "dladm", "show-vnic", "-p", "-o", "link")
		if err != nil {
			errs = append(errs, fmt.Errorf("listing VNICs: %w", err))
		} else if slices.Contains(strings.Fields(string(out)), p.VNIC) {
			if _, err := h.run.Run(ctx, "dladm", "delete-vnic", "-t", p.VNIC); err != nil {
				errs = append(errs, fmt.Errorf("deleting VNIC %s: %w", p.VNIC, err))
			}
		}
	}
	if ds := p.Extra[hxZvol]; ds != "" {
		exists, err := h.datasetExists(ctx, ds)
		if err != nil {
			errs = append(errs, err)
		} else if exists {
			if _, err := h.run.Run(ctx, "zfs", "destroy", ds); err != nil {
				errs = append(errs, fmt.Errorf("destroying zvol %s: %w", ds, err))
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	h.freePort(portOf(p.Endpoint), name)
	if err := os.Remove(h.statePath(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// GuestIP finds the guest's address in the host's ARP table by the VNIC's
// MAC address (the guest must have sent traffic on the link).
func (h *host) GuestIP(ctx context.Context, name string, p Placement) (string, error) {
	if p.MAC == "" {
		return "", fmt.Errorf("propolis vm %s has no NIC: %w", name, backends.ErrNoAddress)
	}
	out, err := h.run.Run(ctx, "arp", "-an")
	if err != nil {
		return "", fmt.Errorf("reading the ARP table: %w", err)
	}
	if ip := arpLookup(string(out), p.MAC); ip != "" {
		return ip, nil
	}
	return "", fmt.Errorf("propolis vm %s: %w yet: MAC %s is not in the ARP table (has the guest configured its network?)", name, backends.ErrNoAddress, p.MAC)
}

// arpLookup finds the IPv4 address of mac in `arp -an` output. illumos
// prints MACs without leading zeros in each octet, so octets are compared
// as numbers.
func arpLookup(out, mac string) string {
	want, ok := parseMAC(mac)
	if !ok {
		return ""
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		ip := net.ParseIP(f[1])
		if ip == nil || ip.To4() == nil {
			continue
		}
		if got, ok := parseMAC(f[len(f)-1]); ok && got == want {
			return f[1]
		}
	}
	return ""
}

func parseMAC(s string) ([6]byte, bool) {
	var out [6]byte
	parts := strings.Split(s, ":")
	if len(parts) != 6 {
		return out, false
	}
	for i, p := range parts {
		n, err := strconv.ParseUint(p, 16, 8)
		if err != nil {
			return out, false
		}
		out[i] = byte(n)
	}
	return out, true
}

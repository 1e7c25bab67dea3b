// Package qemu is the QEMU/KVM backend: one daemonized qemu-system-x86_64
// per VM, driven over QMP, with everything it needs in a work dir
// <data_dir>/vms/<name>:
//
//	vm.json        the handle and spec of this incarnation (the backend's record)
//	disk.qcow2     copy-on-write overlay over the spec's base image
//	seed.iso       NoCloud seed (volume cidata: meta-data, user-data[, network-config])
//	OVMF_VARS.fd   per-VM UEFI variable store (uefi only)
//	qemu.pid       pidfile of the running QEMU
//	qmp.sock       QMP monitor socket
//	serial.sock    serial console socket (ttyS0)
//	console.log    everything the console printed, appended across starts
//	qemu.stderr    QEMU's stderr from the last start
//
// A QEMU outlives the process that started it; a new Backend on the same
// data dir finds it again through the pidfile (Adopt, State), checking
// /proc/<pid>/cmdline so a reused PID never reads as the VM.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

var (
	_ backends.Hypervisor = (*Backend)(nil)
	_ backends.Watcher    = (*Backend)(nil)
	_ backends.Adopter    = (*Backend)(nil)
	_ backends.Capable    = (*Backend)(nil)
)

// Accelerator choices.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Keys of VmHandle.Extra this backend sets.
const (
	ExtraStopPath = "stop_path"    // how Stop ended QEMU: one of the StopPath values (returned by Stop only)
	ExtraBaseFmt  = "base_format"  // the base image's format, as qemu-img detected it
	ExtraOVMFCode = "ovmf_code"    // UEFI firmware image (uefi only)
	ExtraOVMFVars = "ovmf_vars"    // this VM's copy of the UEFI variable store (uefi only)
	ExtraAccelWhy = "accel_reason" // why Start picked handle.Accel
)

// Stop paths: how the QEMU process ended, in the handle Stop returns as
// Extra[ExtraStopPath].
const (
	StopPathACPI = "acpi"    // the guest powered off after system_powerdown
	StopPathTerm = "sigterm" // QEMU ended on SIGTERM after the timeout
	StopPathKill = "sigkill" // QEMU ignored SIGTERM too
	StopPathNone = "none"    // it was not running
)

// Options configure a Backend.
type Options struct {
	// DataDir holds one work dir per VM under vms/. Required.
	DataDir string
	// QEMUBinary and QEMUImg default to qemu-system-x86_64 and qemu-img
	// from PATH.
	QEMUBinary, QEMUImg string
	// IPBinary is iproute2's ip, for tap devices and neighbour lookups;
	// default "ip" from PATH (looked up when first needed).
	IPBinary string
	// Accel is the host default: auto (KVM when the CPU advertises vmx/svm
	// and kvm_intel/kvm_amd is loaded, else TCG), kvm or tcg. A spec's
	// accel overrides it.
	Accel string
	// Host is recorded in handles.
	Host string
	// Logger receives what the backend does; default: discarded.
	Logger *slog.Logger
	// Wrapper is prepended to every qemu-system and ip command, e.g.
	// {"ip", "netns", "exec", "ns1"} to run VMs and their tap devices in a
	// network namespace.
	Wrapper []string
	// ImageRoots are the directories every file of a base image's chain
	// (backing files, vmdk extents, data files) must resolve into
	// (the worker's --image-dir and image store); default: the base
	// image's own directory.
	ImageRoots []string
	// DefaultBridge is used for tap networking when the spec names none.
	DefaultBridge string
	// LeaseFiles are dnsmasq lease files searched by GuestIP for tap VMs;
	// default /var/lib/misc/dnsmasq.leases.
	LeaseFiles []string
	// Firmware lists UEFI code/vars pairs to try, in order; default: the
	// Debian/Fedora OVMF locations.
	Firmware []FirmwarePair
	// WatchInterval is how often Watch polls the QEMU processes (500ms),
	// and rotates their console logs.
	WatchInterval time.Duration
	// LogMaxBytes and LogKeep bound each VM's console log: past
	// LogMaxBytes (2 MiB) it is rotated to console.log.1, keeping LogKeep
	// (3) rotated files (see rotateLog).
	LogMaxBytes int64
	LogKeep     int
	// MigrationTLSDir, if set, holds QEMU's x509 files (ca-cert.pem,
	// server-cert.pem, server-key.pem, client-cert.pem, client-key.pem):
	// migration traffic to and from this host is then TLS with both
	// sides' certificates checked against the CA, and this host neither
	// sends nor takes a migration in clear.
	MigrationTLSDir string
	// DestroyStopTimeout is the graceful-stop timeout Destroy uses (2s).
	DestroyStopTimeout time.Duration
	// TermTimeout is how long Stop waits after SIGTERM before SIGKILL (3s).
	TermTimeout time.Duration

	// procRoot and sysRoot let tests fake /proc and /sys for detection.
	procRoot, sysRoot, devKVM string
}

// FirmwarePair is a UEFI firmware image and the variable store template
// that goes with it.
type FirmwarePair struct {
	Code, Vars string
}

// DefaultFirmware are the OVMF pairs searched when Options.Firmware is empty.
var DefaultFirmware = []FirmwarePair{
	{"/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"},
	{"/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"},
	{"/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"},
	{"/usr/share/qemu/OVMF_CODE.fd", "/usr/share/qemu/OVMF_VARS.fd"},
}

// Backend runs VMs as daemonized QEMU processes.
type Backend struct {
	opts    Options
	dataDir string
	vmsDir  string
	log     *slog.Logger

	locksMu sync.Mutex
	locks   map[string]*sync.Mutex // per VM name: one mutating call at a time

	allocMu sync.Mutex // MAC, port and tap allocation across VMs
	// portMu serialises the migration listeners set up (heldPorts).
	portMu sync.Mutex

	mu    sync.Mutex
	owned map[string]*owned // VMs this Backend started or adopted, by name

	portFree func(port int) bool // tests make it lie to reach QEMU's own check
}

// owned is what Watch needs to know about one VM.
type owned struct {
	h        handle // ID, PID of the incarnation
	stopping bool   // a Stop or Destroy is in progress
}

// New checks the options and returns a Backend.
func New(o Options) (*Backend, error) {
	if o.DataDir == "" {
		return nil, errors.New("qemu backend: no data dir; pass --data-dir")
	}
	dd, err := filepath.Abs(o.DataDir)
	if err != nil {
		return nil, fmt.Errorf("qemu backend: data dir %s: %w", o.DataDir, err)
	}
	vmsDir := filepath.Join(dd, "vms")
	if err := os.MkdirAll(vmsDir, 0o700); err == nil {
		err = os.Chmod(vmsDir, 0o700) // VMs' disks and seeds are the worker's only
	}
	if err != nil {
		return nil, fmt.Errorf("qemu backend: data dir %s is not usable: %w; pass a --data-dir this user can write", dd, err)
	}
	probe, err := os.CreateTemp(vmsDir, ".probe-")
	if err != nil {
		return nil, fmt.Errorf("qemu backend: data dir %s is not writable: %w; pass a --data-dir this user can write", dd, err)
	}
	probe.Close()
	os.Remove(probe.Name())

	if o.QEMUBinary, err = lookBinary(o.QEMUBinary, "qemu-system-x86_64", "install qemu-system-x86 (apt-get install qemu-system-x86) or set the QEMU binary path"); err != nil {
		return nil, fmt.Errorf("qemu backend: %w", err)
	}
	if o.QEMUImg, err = lookBinary(o.QEMUImg, "qemu-img", "install qemu-utils (apt-get install qemu-utils) or set the qemu-img path"); err != nil {
		return nil, fmt.Errorf("qemu backend: %w", err)
	}
	switch o.Accel {
	case "":
		o.Accel = AccelAuto
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		return nil, fmt.Errorf("qemu backend: accel %q is not one of auto, kvm, tcg", o.Accel)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if len(o.LeaseFiles) == 0 {
		o.LeaseFiles = []string{"/var/lib/misc/dnsmasq.leases"}
	}
	if len(o.Firmware) == 0 {
		o.Firmware = DefaultFirmware
	}
	if o.LogMaxBytes <= 0 {
		o.LogMaxBytes = DefaultLogMaxBytes
	}
	if o.LogKeep <= 0 {
		o.LogKeep = DefaultLogKeep
	}
	if o.WatchInterval <= 0 {
		o.WatchInterval = 500 * time.Millisecond
	}
	if o.DestroyStopTimeout <= 0 {
		o.DestroyStopTimeout = 2 * time.Second
	}
	if o.TermTimeout <= 0 {
		o.TermTimeout = 3 * time.Second
	}
	if o.procRoot == "" {
		o.procRoot = "/proc"
	}
	if o.sysRoot == "" {
		o.sysRoot = "/sys"
	}
	if o.devKVM == "" {
		o.devKVM = "/dev/kvm"
	}
	return &Backend{
		opts:    o,
		dataDir: dd,
		vmsDir:  vmsDir,
		log:     o.Logger.With("backend", "qemu"),
		locks:   map[string]*sync.Mutex{},
		owned:   map[string]*owned{},

		portFree: portFree,
	}, nil
}

// lookBinary resolves a configured or default binary, with a hint when missing.
func lookBinary(configured, def, hint string) (string, error) {
	name := configured
	if name == "" {
		name = def
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("%s not found: %w; %s", name, err, hint)
	}
	return p, nil
}

// Capabilities: QEMU can suspend (pause) and resume.
func (b *Backend) Capabilities() api.Capabilities {
	return api.Capabilities{Suspend: true, Resume: true, Migrate: true}
}

// lockCtx serialises mutating calls on one VM, waiting at most as long as
// ctx allows (a Stop may hold the lock for its whole timeout).
func (b *Backend) lockCtx(ctx context.Context, name string) (func(), error) {
	b.locksMu.Lock()
	m, ok := b.locks[name]
	if !ok {
		m = &sync.Mutex{}
		b.locks[name] = m
	}
	b.locksMu.Unlock()
	for {
		if m.TryLock() {
			return m.Unlock, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for another call on vm %s: %w", name, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// setOwned records that this Backend is responsible for h's QEMU process.
func (b *Backend) setOwned(h handle) {
	c, _ := full(h.Clone()) // a copy: the data as written decodes
	b.mu.Lock()
	defer b.mu.Unlock()
	b.owned[h.Name] = &owned{h: c}
}

// setStopping marks a stop in progress so Watch does not report it.
func (b *Backend) setStopping(name string, on bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if o, ok := b.owned[name]; ok {
		o.stopping = on
	} else if on {
		b.owned[name] = &owned{stopping: true}
	}
}

func (b *Backend) disown(name string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.owned, name)
}

func (b *Backend) accelFor(spec *api.VmSpec) string {
	if spec != nil && spec.Accel != "" && spec.Accel != AccelAuto {
		return spec.Accel
	}
	return b.opts.Accel
}

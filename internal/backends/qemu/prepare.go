package qemu

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/imagechain"
)

// Prepare creates the VM's work dir: overlay disk, seed ISO, firmware vars,
// MAC, forwarded SSH port or tap name, and vm.json. Preparing a name that
// is already prepared returns the existing handle. A failed Prepare leaves
// nothing behind.
func (b *Backend) Prepare(ctx context.Context, spec api.VmSpec) (api.VmHandle, error) {
	h, err := b.prepare(ctx, spec)
	if err != nil {
		return api.VmHandle{}, fmt.Errorf("preparing vm %s: %w", spec.Name, err)
	}
	return h, nil
}

func (b *Backend) prepare(ctx context.Context, spec api.VmSpec) (api.VmHandle, error) {
	if spec.Backend == "" {
		spec.Backend = api.BackendQEMU
	}
	spec = spec.WithDefaults()
	if spec.Backend != api.BackendQEMU {
		return api.VmHandle{}, fmt.Errorf("%w: spec.backend is %q, this is the qemu backend", api.ErrInvalid, spec.Backend)
	}
	if err := spec.Validate(); err != nil {
		return api.VmHandle{}, err
	}
	nc := *spec.Network
	switch nc.Type {
	case api.NetworkUser, api.NetworkNone:
	case api.NetworkTap:
		if nc.Bridge == "" {
			nc.Bridge = b.opts.DefaultBridge
		}
		if nc.Bridge == "" {
			return api.VmHandle{}, fmt.Errorf("%w: spec.network.bridge: tap networking needs a bridge; name one in the spec or configure a default bridge", api.ErrInvalid)
		}
	case api.NetworkVnic:
		return api.VmHandle{}, fmt.Errorf("vnic networking is for the propolis backend; use user, tap or none: %w", backends.ErrUnsupported)
	}
	spec.Network = &nc

	wd, err := b.workDir(spec.Name)
	if err != nil {
		return api.VmHandle{}, err
	}
	unlock, err := b.lockCtx(ctx, spec.Name)
	if err != nil {
		return api.VmHandle{}, err
	}
	defer unlock()

	if r, err := readRecord(wd); err == nil {
		return r.Handle.Clone(), nil // already prepared: idempotent
	} else if !errors.Is(err, fs.ErrNotExist) {
		return api.VmHandle{}, err
	}
	if len(filepath.Join(wd, serialSock)) > maxSockPath {
		return api.VmHandle{}, fmt.Errorf("socket path %s is longer than the %d bytes a unix socket allows; use a shorter data dir or VM name", filepath.Join(wd, serialSock), maxSockPath)
	}

	chain, err := b.inspectChain(ctx, spec.ImagePath, "")
	if err != nil {
		return api.VmHandle{}, err
	}
	base, info := chain[0].Path, chain[0]
	var fw FirmwarePair
	if spec.UEFI {
		if fw, err = b.findFirmware(); err != nil {
			return api.VmHandle{}, err
		}
	}
	if spec.DiskGB > 0 && int64(spec.DiskGB)<<30 < info.VirtualSize {
		return api.VmHandle{}, fmt.Errorf("%w: spec.disk_gb: %d GiB is smaller than the base image %s (%d bytes); ask for at least %d GiB or leave it out",
			api.ErrInvalid, spec.DiskGB, base, info.VirtualSize, (info.VirtualSize+(1<<30)-1)>>30)
	}

	// A work dir without vm.json is a Prepare that died half way.
	if err := os.RemoveAll(wd); err != nil {
		return api.VmHandle{}, fmt.Errorf("removing the leftovers of an earlier prepare in %s: %w", wd, err)
	}
	if err := os.Mkdir(wd, 0o700); err != nil {
		return api.VmHandle{}, fmt.Errorf("creating work dir: %w; the data dir must be writable by the worker", err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = os.RemoveAll(wd)
		}
	}()

	// The overlay is made without opening the chain (-u, its size given):
	// the chain was checked above and QEMU is handed it layer by layer.
	disk := filepath.Join(wd, diskFile)
	size := max(info.VirtualSize, int64(spec.DiskGB)<<30)
	if err := b.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-u", "-F", info.Format, "-b", base, disk, strconv.FormatInt(size, 10)); err != nil {
		return api.VmHandle{}, fmt.Errorf("creating overlay over %s: %w", base, err)
	}
	if err := writeSeedISO(filepath.Join(wd, seedFile), spec); err != nil {
		return api.VmHandle{}, err
	}
	// Only the worker's user (root, which runs QEMU) reads a VM's disk,
	// seed (its user data) and console.
	for _, f := range []string{disk, filepath.Join(wd, seedFile)} {
		if err := os.Chmod(f, 0o600); err != nil {
			return api.VmHandle{}, err
		}
	}
	if err := touch(filepath.Join(wd, consoleLog)); err != nil {
		return api.VmHandle{}, err
	}
	s := spec
	h := handle{
		VmHandle: api.VmHandle{
			ID:      newID(),
			Name:    spec.Name,
			Backend: api.BackendQEMU,
			Host:    b.opts.Host,
			WorkDir: wd,
			Spec:    &s,
		},
		HandleData: HandleData{
			QMPSocket:  filepath.Join(wd, qmpSock),
			SerialSock: filepath.Join(wd, serialSock),
			SerialLog:  filepath.Join(wd, consoleLog),
			Extra:      map[string]string{ExtraBaseFmt: info.Format},
		},
	}
	if spec.UEFI {
		vars := filepath.Join(wd, varsFile)
		if err := copyFile(fw.Vars, vars); err != nil {
			return api.VmHandle{}, fmt.Errorf("copying UEFI vars %s: %w", fw.Vars, err)
		}
		h.Extra[ExtraOVMFCode] = fw.Code
		h.Extra[ExtraOVMFVars] = vars
	}

	b.allocMu.Lock()
	err = b.allocate(&h)
	if err == nil {
		err = (&record{Version: 1, Handle: h, Chain: chain}).save()
	}
	b.allocMu.Unlock()
	if err != nil {
		return api.VmHandle{}, err
	}
	ok = true
	b.log.Info("prepared vm", "vm", h.Name, "id", h.ID, "base", base, "format", info.Format, "layers", len(chain), "network", nc.Type, "mac", h.MAC)
	return h.Clone(), nil
}

// inspectChain checks the base image and every file its chain makes QEMU
// open (package imagechain): all inside the image roots (default: the
// base image's own directory) and outside the VMs' work directories.
// format pins the base image's format ("" detects it).
func (b *Backend) inspectChain(ctx context.Context, path, format string) (imagechain.Chain, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("base image %s: %w", path, err)
	}
	st, err := os.Stat(abs)
	if err != nil {
		return nil, fmt.Errorf("base image %s: %w; check spec.image_path", abs, err)
	}
	if !st.Mode().IsRegular() && st.Mode()&fs.ModeDevice == 0 {
		return nil, fmt.Errorf("base image %s is not a file; spec.image_path must name a disk image", abs)
	}
	roots := b.opts.ImageRoots
	if len(roots) == 0 {
		res, err := filepath.EvalSymlinks(abs)
		if err != nil {
			return nil, fmt.Errorf("base image %s: %w", abs, err)
		}
		roots = []string{filepath.Dir(res)}
	}
	p := imagechain.Policy{QEMUImg: b.opts.QEMUImg, Roots: roots, Exclude: []string{b.vmsDir}}
	chain, err := p.Inspect(ctx, abs, format)
	if err != nil {
		return nil, fmt.Errorf("base image %s: %w", abs, err)
	}
	return chain, nil
}

// findFirmware returns the first complete OVMF code/vars pair.
func (b *Backend) findFirmware() (FirmwarePair, error) {
	var tried []string
	for _, p := range b.opts.Firmware {
		_, e1 := os.Stat(p.Code)
		_, e2 := os.Stat(p.Vars)
		if e1 == nil && e2 == nil {
			return p, nil
		}
		tried = append(tried, p.Code+" + "+p.Vars)
	}
	return FirmwarePair{}, fmt.Errorf("spec.uefi is set but no OVMF firmware was found (tried %s); install ovmf or set uefi false", strings.Join(tried, ", "))
}

// allocate picks a MAC unique among this host's VMs, and the forwarded SSH
// port (user) or tap device name (tap). Called with allocMu held.
func (b *Backend) allocate(h *handle) error {
	others := b.allRecords(h.Name)
	macs, taps, ports := map[string]bool{}, map[string]bool{}, map[int]bool{}
	for _, r := range others {
		macs[strings.ToLower(r.Handle.MAC)] = true
		taps[r.Handle.TapDevice] = true
		ports[r.Handle.SSHPort] = true
	}
	for i := 0; ; i++ {
		if i == 100 {
			return errors.New("could not find a free MAC address")
		}
		mac := newMAC(h.Name)
		if !macs[mac] {
			h.MAC = mac
			break
		}
	}
	switch h.Spec.Network.Type {
	case api.NetworkUser:
		p, err := freePort(ports)
		if err != nil {
			return fmt.Errorf("picking the SSH forward port: %w", err)
		}
		h.SSHPort = p
	case api.NetworkTap:
		for i := 0; ; i++ {
			if i == 100 {
				return errors.New("could not find a free tap device name")
			}
			t := tapName(h.Name, i)
			if !taps[t] {
				h.TapDevice = t
				break
			}
		}
	}
	return nil
}

// newMAC derives a locally administered unicast MAC from the name and
// random bytes.
func newMAC(name string) string {
	var r [8]byte
	_, _ = rand.Read(r[:])
	sum := sha256.Sum256(append([]byte(name), r[:]...))
	return fmt.Sprintf("02:%02x:%02x:%02x:%02x:%02x", sum[0], sum[1], sum[2], sum[3], sum[4])
}

// tapName derives a tap device name (at most 15 bytes) from the VM name.
func tapName(name string, attempt int) string {
	sum := sha256.Sum256([]byte(name + "#" + strconv.Itoa(attempt)))
	short := name
	if len(short) > 6 {
		short = short[:6]
	}
	return "vh" + short + "-" + hex.EncodeToString(sum[:])[:6]
}

// freePort returns a TCP port free on 127.0.0.1 and not in avoid.
func freePort(avoid map[int]bool) (int, error) {
	for i := 0; i < 20; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !avoid[p] {
			return p, nil
		}
	}
	return 0, errors.New("no free port found")
}

// portFree says whether 127.0.0.1:p can be bound now.
func portFree(p int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		return false
	}
	l.Close()
	return true
}

func newID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (b *Backend) qemuImg(ctx context.Context, args ...string) error {
	_, err := b.qemuImgOutput(ctx, args...)
	return err
}

func (b *Backend) qemuImgOutput(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, b.opts.QEMUImg, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			return nil, fmt.Errorf("qemu-img %s: %w", args[0], err)
		}
		return nil, fmt.Errorf("qemu-img %s: %w: %s", args[0], err, msg)
	}
	return stdout.Bytes(), nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// touch creates an empty file readable by its owner only, unless it exists.
func touch(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	return f.Close()
}

// Package guestimage builds the tiny x86_64 guest that vmherd's QEMU tests
// boot: the host's Debian kernel, an initramfs of busybox-static, a few
// kernel modules and an /init script, on a FAT16 partition that syslinux
// boots, converted to qcow2. It builds in a few seconds without root (no
// loop mounts), and the result is cached under a key that hashes every input.
//
// What the guest does, in order, all of it reported on ttyS0:
//   - mounts the NoCloud seed (an iso9660 volume labelled cidata) and prints
//     "instance-id: X" and "local-hostname: Y" from its meta-data, then sets
//     the hostname;
//   - brings every NIC up and runs udhcpc on it (lease printed as
//     "vmherd-guest: eth0 bound A.B.C.D/N");
//   - runs an SSH server (Debian's dropbear) on TCP 22, whose banner starts
//     with SSHBanner, with a host key made at boot and printed on the
//     console between provision.HostKeysBegin and HostKeysEnd (as cloud-init does);
//     the public keys in the seed's user-data may log in as root and as
//     each user the user-data names;
//   - runs acpid, whose power-button handler does "poweroff -f", unless told
//     to ignore ACPI (see IgnoreACPIKey);
//   - prints ReadyMarker, then keeps a shell on the console.
package guestimage

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"embed"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Guest protocol: what the tests look for.
const (
	// ReadyMarker is printed on ttyS0 once the guest has started its
	// services (and got its first DHCP lease, if it has a NIC).
	ReadyMarker = "VMHERD-GUEST-READY"
	// SSHBanner starts the line the guest's SSH server sends.
	SSHBanner = "SSH-2.0-dropbear"
	// IgnoreACPIKey makes the guest ignore the ACPI power button, so the
	// forced stop path can be tested: a top-level line
	// "vmherd-ignore-acpi: true" in the seed's meta-data or user-data
	// (user-data "#cloud-config\nvmherd-ignore-acpi: true\n" is still
	// valid cloud-config). The kernel argument vmherd.ignore_acpi=1 does
	// the same.
	IgnoreACPIKey = "vmherd-ignore-acpi"
	// IgnoreACPIUserData is user-data that makes the guest ignore ACPI.
	IgnoreACPIUserData = "#cloud-config\n" + IgnoreACPIKey + ": true\n"
)

// builderVersion is part of the cache key: bump it when the build changes
// in a way the hashed inputs do not show.
const builderVersion = "vmherd-guest-3"

// epoch is the timestamp every file in the image carries.
const epoch = 946684800 // 2000-01-01T00:00:00Z

//go:embed files
var files embed.FS

// Options locate the build's inputs. Zero values mean the Debian defaults.
type Options struct {
	// KernelVersion picks /boot/vmlinuz-<version> and
	// /lib/modules/<version>; default: the newest kernel that has both.
	KernelVersion string
	BootDir       string // default /boot
	ModulesRoot   string // default /lib/modules
	Busybox       string // a static busybox; default /bin/busybox
	// Dropbear and DropbearKey: the guest's SSH server and key maker
	// (dynamically linked: their libraries go into the initramfs too);
	// default /usr/sbin/dropbear and /usr/bin/dropbearkey.
	Dropbear, DropbearKey string
	// SFTPServer serves dropbear's sftp subsystem (provisioning copies
	// files with SFTP); default /usr/lib/openssh/sftp-server.
	SFTPServer  string
	SyslinuxMBR string // default /usr/lib/syslinux/mbr/mbr.bin (or /usr/lib/SYSLINUX/mbr.bin)
	// Tools; defaults are looked up in PATH (and /sbin, /usr/sbin).
	QEMUImg, MkfsFat, Mcopy, Syslinux string
}

// Packages are the Debian packages the build reads from.
var Packages = []string{"linux-image-amd64", "busybox-static", "dropbear-bin", "openssh-sftp-server", "syslinux", "syslinux-common", "mtools", "dosfstools", "qemu-utils"}

// Build builds the guest image (or finds it cached) under cacheDir and
// returns the path of the qcow2 file. The file is shared: use it only as a
// read-only backing image.
func Build(ctx context.Context, cacheDir string) (string, error) {
	return BuildWith(ctx, cacheDir, Options{})
}

// BuildWith is Build with explicit inputs. A relative cacheDir is taken
// from the current directory; the returned path is always absolute, since
// the build runs its tools inside a directory of its own and the image is
// handed to processes started elsewhere.
func BuildWith(ctx context.Context, cacheDir string, o Options) (string, error) {
	in, err := o.inputs()
	if err != nil {
		return "", fmt.Errorf("building guest image: %w", err)
	}
	if cacheDir, err = filepath.Abs(cacheDir); err != nil {
		return "", fmt.Errorf("building guest image: cache dir: %w", err)
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", fmt.Errorf("building guest image: cache dir: %w", err)
	}
	final := filepath.Join(cacheDir, "guest-"+in.key[:16]+".qcow2")
	if _, err := os.Stat(final); err == nil {
		return final, nil
	}
	// One build at a time per cache dir, across processes (go test runs
	// packages in parallel).
	unlock, err := lockFile(ctx, filepath.Join(cacheDir, ".build.lock"))
	if err != nil {
		return "", fmt.Errorf("building guest image: %w", err)
	}
	defer unlock()
	if _, err := os.Stat(final); err == nil {
		return final, nil
	}
	tmp, err := os.MkdirTemp(cacheDir, ".build-")
	if err != nil {
		return "", fmt.Errorf("building guest image: %w", err)
	}
	defer os.RemoveAll(tmp)
	out, err := in.build(ctx, tmp)
	if err != nil {
		return "", fmt.Errorf("building guest image: %w", err)
	}
	if err := os.Rename(out, final); err != nil {
		return "", fmt.Errorf("building guest image: %w", err)
	}
	return final, nil
}

// inputs is everything the build reads, resolved and hashed.
type inputs struct {
	kernelVersion string
	kernel        string
	modDir        string
	modules       []string // relative to modDir, in load order
	busybox       string
	dropbear      string
	dropbearKey   string
	sftpServer    string
	libs          []string // the shared libraries dropbear needs
	mbr           string
	qemuImg       string
	mkfsFat       string
	mcopy         string
	syslinux      string
	key           string
}

func (o Options) inputs() (*inputs, error) {
	in := &inputs{}
	boot := or(o.BootDir, "/boot")
	modRoot := or(o.ModulesRoot, "/lib/modules")
	in.kernelVersion = o.KernelVersion
	if in.kernelVersion == "" {
		v, err := newestKernel(boot, modRoot)
		if err != nil {
			return nil, err
		}
		in.kernelVersion = v
	}
	in.kernel = filepath.Join(boot, "vmlinuz-"+in.kernelVersion)
	in.modDir = filepath.Join(modRoot, in.kernelVersion)
	if _, err := os.Stat(in.kernel); err != nil {
		return nil, fmt.Errorf("kernel: %w (install linux-image-amd64)", err)
	}
	mods, err := resolveModules(in.modDir, guestModules)
	if err != nil {
		return nil, fmt.Errorf("kernel modules: %w (install linux-image-amd64)", err)
	}
	for _, m := range mods {
		if !strings.HasSuffix(m, ".ko") {
			return nil, fmt.Errorf("kernel module %s is compressed; the guest's busybox insmod needs plain .ko files", m)
		}
	}
	in.modules = mods
	in.busybox = or(o.Busybox, "/bin/busybox")
	if err := checkStatic(in.busybox); err != nil {
		return nil, fmt.Errorf("busybox: %w (install busybox-static)", err)
	}
	in.dropbear = or(o.Dropbear, "/usr/sbin/dropbear")
	in.dropbearKey = or(o.DropbearKey, "/usr/bin/dropbearkey")
	in.sftpServer = or(o.SFTPServer, "/usr/lib/openssh/sftp-server")
	for _, p := range []string{in.dropbear, in.dropbearKey, in.sftpServer} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("the guest's SSH server: %w (install dropbear-bin and openssh-sftp-server)", err)
		}
	}
	if in.libs, err = sharedLibs(in.dropbear, in.dropbearKey, in.sftpServer); err != nil {
		return nil, fmt.Errorf("the guest's SSH server: %w", err)
	}
	in.mbr = o.SyslinuxMBR
	if in.mbr == "" {
		in.mbr = firstExisting("/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin", "/usr/share/syslinux/mbr.bin")
		if in.mbr == "" {
			return nil, errors.New("syslinux mbr.bin not found (install syslinux-common)")
		}
	}
	tools := []struct {
		dst       *string
		opt, name string
		pkg       string
	}{
		{&in.qemuImg, o.QEMUImg, "qemu-img", "qemu-utils"},
		{&in.mkfsFat, o.MkfsFat, "mkfs.fat", "dosfstools"},
		{&in.mcopy, o.Mcopy, "mcopy", "mtools"},
		{&in.syslinux, o.Syslinux, "syslinux", "syslinux"},
	}
	for _, t := range tools {
		p, err := lookTool(or(t.opt, t.name))
		if err != nil {
			return nil, fmt.Errorf("%s not found: %w (install %s)", t.name, err, t.pkg)
		}
		*t.dst = p
	}

	h := sha256.New()
	fmt.Fprintf(h, "builder %s\nkernel %s\n", builderVersion, in.kernelVersion)
	hashFiles := append([]string{in.kernel, in.busybox, in.mbr, in.syslinux, in.dropbear, in.dropbearKey, in.sftpServer}, prefixAll(in.modDir, in.modules)...)
	hashFiles = append(hashFiles, in.libs...)
	for _, f := range hashFiles {
		if err := hashFile(h, f); err != nil {
			return nil, err
		}
	}
	entries, _ := files.ReadDir("files")
	for _, e := range entries {
		b, _ := files.ReadFile("files/" + e.Name())
		fmt.Fprintf(h, "embedded %s %d\n", e.Name(), len(b))
		h.Write(b)
	}
	in.key = hex.EncodeToString(h.Sum(nil))
	return in, nil
}

func (in *inputs) build(ctx context.Context, dir string) (string, error) {
	initrd, err := in.initramfs()
	if err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}
	stage := filepath.Join(dir, "stage")
	if err := os.Mkdir(stage, 0o755); err != nil {
		return "", err
	}
	kernel, err := os.ReadFile(in.kernel)
	if err != nil {
		return "", err
	}
	cfg, _ := files.ReadFile("files/syslinux.cfg")
	staged := []struct {
		name string
		data []byte
	}{{"vmlinuz", kernel}, {"initrd.gz", initrd}, {"syslinux.cfg", cfg}}
	var args []string
	payload := 0
	for _, s := range staged {
		p := filepath.Join(stage, s.name)
		if err := os.WriteFile(p, s.data, 0o644); err != nil {
			return "", err
		}
		t := time.Unix(epoch, 0)
		if err := os.Chtimes(p, t, t); err != nil {
			return "", err
		}
		args = append(args, p)
		payload += len(s.data)
	}

	// A raw disk: MBR + 1 MiB gap + one active FAT16 partition.
	const partStart = 2048 // sectors
	partBytes := roundUp(int64(payload)+4<<20, 1<<20)
	if partBytes < 24<<20 {
		partBytes = 24 << 20
	}
	raw := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(raw, nil, 0o644); err != nil {
		return "", err
	}
	if err := os.Truncate(raw, partStart*512+partBytes); err != nil {
		return "", err
	}
	env := append(os.Environ(), "SOURCE_DATE_EPOCH="+strconv.Itoa(epoch), "MTOOLS_SKIP_CHECK=1", "TZ=UTC")
	run := func(name string, args ...string) error {
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Env = env
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, bytes.TrimSpace(out))
		}
		return nil
	}
	off := strconv.Itoa(partStart)
	if err := run(in.mkfsFat, "-F", "16", "-n", "VMHERDBOOT", "-i", "766d6872", "--invariant",
		"--offset", off, "-h", off, raw, strconv.FormatInt(partBytes/1024, 10)); err != nil {
		return "", err
	}
	img := raw + "@@" + strconv.Itoa(partStart*512)
	if err := run(in.mcopy, append(append([]string{"-m", "-i", img}, args...), "::")...); err != nil {
		return "", err
	}
	if err := run(in.syslinux, "--offset", strconv.Itoa(partStart*512), "--install", raw); err != nil {
		return "", err
	}
	if err := in.writeMBR(raw, partStart, partBytes/512); err != nil {
		return "", err
	}
	out := filepath.Join(dir, "guest.qcow2")
	if err := run(in.qemuImg, "convert", "-q", "-f", "raw", "-O", "qcow2", raw, out); err != nil {
		return "", err
	}
	return out, nil
}

// writeMBR puts syslinux's MBR boot code and a partition table with one
// active FAT16 partition in sector 0.
func (in *inputs) writeMBR(raw string, start, sectors int64) error {
	code, err := os.ReadFile(in.mbr)
	if err != nil {
		return err
	}
	if len(code) > 440 {
		code = code[:440]
	}
	var mbr [512]byte
	copy(mbr[:], code)
	binary.LittleEndian.PutUint32(mbr[440:], 0x766d6872) // disk signature
	e := mbr[446:462]
	e[0] = 0x80 // active
	copy(e[1:4], chs(start))
	e[4] = 0x06 // FAT16
	copy(e[5:8], chs(start+sectors-1))
	binary.LittleEndian.PutUint32(e[8:], uint32(start))
	binary.LittleEndian.PutUint32(e[12:], uint32(sectors))
	mbr[510], mbr[511] = 0x55, 0xaa
	f, err := os.OpenFile(raw, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(mbr[:], 0); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// chs encodes an LBA in the 255-head, 63-sector geometry BIOSes assume.
func chs(lba int64) []byte {
	const heads, spt = 255, 63
	c := lba / (heads * spt)
	if c > 1023 {
		return []byte{0xfe, 0xff, 0xff}
	}
	h := (lba / spt) % heads
	s := lba%spt + 1
	return []byte{byte(h), byte(s) | byte((c>>2)&0xc0), byte(c)}
}

// initramfs builds the gzipped newc archive.
func (in *inputs) initramfs() ([]byte, error) {
	var buf bytes.Buffer
	gz, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	c := &cpioWriter{w: gz}
	for _, d := range []string{"bin", "dev", "etc", "etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules",
		"mnt", "mnt/cidata", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin", "var", "var/run"} {
		c.Dir(d)
	}
	c.CharDev("dev/console", 0o600, 5, 1)
	c.CharDev("dev/null", 0o666, 1, 3)
	bb, err := os.ReadFile(in.busybox)
	if err != nil {
		return nil, err
	}
	c.File("bin/busybox", 0o755, bb)
	c.Symlink("bin/sh", "busybox")
	// The SSH server, its key maker and the libraries they load, at the
	// host's paths.
	for _, f := range append([]string{in.dropbear, in.dropbearKey}, in.libs...) {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		rel := strings.TrimPrefix(f, "/")
		c.MkdirAll(filepath.Dir(rel))
		c.File(rel, 0o755, b)
	}
	// Where dropbear looks for it.
	sftp, err := os.ReadFile(in.sftpServer)
	if err != nil {
		return nil, err
	}
	c.MkdirAll("usr/lib")
	c.File("usr/lib/sftp-server", 0o755, sftp)
	for _, f := range []struct {
		src, dst string
		perm     uint32
	}{
		{"init", "init", 0o755},
		{"udhcpc.script", "etc/udhcpc.script", 0o755},
		{"power-button", "etc/acpi/PWRF/00000080", 0o755},
	} {
		b, err := files.ReadFile("files/" + f.src)
		if err != nil {
			return nil, err
		}
		c.File(f.dst, f.perm, b)
	}
	var order strings.Builder
	for _, m := range in.modules {
		b, err := os.ReadFile(filepath.Join(in.modDir, m))
		if err != nil {
			return nil, err
		}
		name := filepath.Base(m)
		c.File("lib/modules/"+name, 0o644, b)
		order.WriteString(name + "\n")
	}
	c.File("etc/modules", 0o644, []byte(order.String()))
	c.File("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	c.File("etc/group", 0o644, []byte("root:x:0:\n"))
	c.File("etc/shells", 0o644, []byte("/bin/sh\n"))
	if err := c.Close(); err != nil {
		return nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func newestKernel(boot, modRoot string) (string, error) {
	matches, _ := filepath.Glob(filepath.Join(boot, "vmlinuz-*"))
	var vs []string
	for _, m := range matches {
		v := strings.TrimPrefix(filepath.Base(m), "vmlinuz-")
		if _, err := os.Stat(filepath.Join(modRoot, v, "modules.dep")); err == nil {
			vs = append(vs, v)
		}
	}
	if len(vs) == 0 {
		return "", fmt.Errorf("no kernel found: want %s/vmlinuz-<v> with %s/<v>/modules.dep (install linux-image-amd64)", boot, modRoot)
	}
	sort.Slice(vs, func(i, j int) bool { return versionLess(vs[i], vs[j]) })
	return vs[len(vs)-1], nil
}

// versionLess compares dotted/dashed versions numerically where it can.
func versionLess(a, b string) bool {
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '.' || r == '-' || r == '+' || r == '~' })
	}
	pa, pb := split(a), split(b)
	for i := 0; i < len(pa) && i < len(pb); i++ {
		na, ea := strconv.Atoi(pa[i])
		nb, eb := strconv.Atoi(pb[i])
		switch {
		case ea == nil && eb == nil && na != nb:
			return na < nb
		case (ea != nil || eb != nil) && pa[i] != pb[i]:
			return pa[i] < pb[i]
		}
	}
	return len(pa) < len(pb)
}

func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; the initramfs needs a static busybox", path)
		}
	}
	return nil
}

func hashFile(h io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fmt.Fprintf(h, "file %s\n", filepath.Base(path))
	_, err = io.Copy(h, f)
	return err
}

func lookTool(name string) (string, error) {
	if strings.Contains(name, "/") {
		if _, err := os.Stat(name); err != nil {
			return "", err
		}
		return name, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/bin"} {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", exec.ErrNotFound
}

// lockFile takes an exclusive flock, polling so ctx can end the wait.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for the build lock %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func or(s, def string) string {
	if s != "" {
		return s
	}
	return def
}

func firstExisting(paths ...string) string {
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

func prefixAll(dir string, rel []string) []string {
	out := make([]string, len(rel))
	for i, r := range rel {
		out[i] = filepath.Join(dir, r)
	}
	return out
}

func roundUp(n, m int64) int64 { return (n + m - 1) / m * m }

// Package preflight checks that a machine can be a vmherd host, and says
// what it found: the QEMU binaries, KVM or TCG, bridges for tap
// networking, disk space, the clock, the NATS servers' ports, and the
// modes of the files the worker reads as root.
package preflight

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Status of a check.
type Status string

const (
	OK   Status = "ok"
	Warn Status = "warn"
	Fail Status = "FAIL"
)

// Check is one finding.
type Check struct {
	Name   string
	Status Status
	Detail string
}

// Options say what to check.
type Options struct {
	// QEMU: the qemu backend is enabled.
	QEMU bool
	// DataDir is where VMs' disks go.
	DataDir string
	// NATSURLs are the servers to reach (comma separated).
	NATSURLs string
	// Files are files the worker reads as root (credentials, CA, config):
	// they must be the owner's and not writable by others; Secret ones
	// not readable by others either.
	Files, Secrets []string
	// MetricsListen is an address the worker will listen on ("" none).
	MetricsListen string
	// Skew, when measured (joining), is this clock minus the fleet's.
	Skew *time.Duration
	// MinFreeGiB below which disk space is a failure (warning under 10×).
	MinFreeGiB uint64
}

// qemuArch is QEMU's name for this machine's architecture.
func qemuArch() string {
	switch runtime.GOARCH {
	case "amd64":
		return "x86_64"
	case "arm64":
		return "aarch64"
	}
	return runtime.GOARCH
}

// Run makes every check.
func Run(ctx context.Context, o Options) []Check {
	var out []Check
	add := func(name string, st Status, format string, args ...any) {
		out = append(out, Check{name, st, fmt.Sprintf(format, args...)})
	}
	if o.QEMU {
		for _, bin := range []string{"qemu-system-" + qemuArch(), "qemu-img"} {
			p, err := exec.LookPath(bin)
			if err != nil {
				add("qemu", Fail, "%s not found on PATH: install QEMU (Debian: apt-get install qemu-system-x86 qemu-utils)", bin)
				continue
			}
			v, _ := exec.CommandContext(ctx, p, "--version").Output()
			first, _, _ := strings.Cut(string(v), "\n")
			add("qemu", OK, "%s (%s)", p, strings.TrimSpace(first))
		}
		if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
			f.Close()
			add("accel", OK, "KVM: /dev/kvm is usable")
		} else {
			add("accel", Warn, "no KVM (%v): VMs run with TCG, emulated and many times slower", err)
		}
	}
	if bridges := bridges(); len(bridges) > 0 {
		add("bridge", OK, "bridges for tap networking: %s", strings.Join(bridges, ", "))
	} else {
		add("bridge", Warn, "no bridge: VMs get user networking only (tap networking needs one, e.g. br0)")
	}
	if o.DataDir != "" {
		d := existing(o.DataDir)
		if free, err := freeGiB(d); err != nil {
			add("disk", Warn, "%s: %v", d, err)
		} else {
			min := max(o.MinFreeGiB, 1)
			switch {
			case free < min:
				add("disk", Fail, "%d GiB free under %s (need %d)", free, d, min)
			case free < 10*min:
				add("disk", Warn, "%d GiB free under %s: room for few VM disks", free, d)
			default:
				add("disk", OK, "%d GiB free under %s", free, d)
			}
		}
	}
	switch {
	case o.Skew != nil && (*o.Skew > 2*time.Second || *o.Skew < -2*time.Second):
		add("clock", Fail, "this clock is %s off the fleet's: JWT expiry, heartbeats and host timeouts need them within 2s (run chrony or systemd-timesyncd)", o.Skew.Round(time.Millisecond))
	case o.Skew != nil:
		add("clock", OK, "within %s of the fleet's", abs(*o.Skew).Round(time.Millisecond))
	default:
		if v, err := exec.CommandContext(ctx, "timedatectl", "show", "-p", "NTPSynchronized", "--value").Output(); err == nil && strings.TrimSpace(string(v)) == "yes" {
			add("clock", OK, "NTP synchronised (timedatectl)")
		} else {
			add("clock", Warn, "cannot tell whether the clock is synchronised (timedatectl: NTPSynchronized is not yes): run chrony or systemd-timesyncd")
		}
	}
	for _, u := range strings.Split(o.NATSURLs, ",") {
		u = strings.TrimSpace(u)
		if u == "" {
			continue
		}
		pu, err := url.Parse(u)
		if err != nil || pu.Host == "" {
			add("ports", Fail, "NATS URL %q does not parse", u)
			continue
		}
		hp := pu.Host
		if pu.Port() == "" {
			hp = net.JoinHostPort(pu.Hostname(), "4222")
		}
		c, err := (&net.Dialer{Timeout: 3 * time.Second}).DialContext(ctx, "tcp", hp)
		if err != nil {
			add("ports", Warn, "NATS %s: %v (a node may be down; the worker needs one)", hp, err)
			continue
		}
		c.Close()
		add("ports", OK, "NATS %s reachable", hp)
	}
	if o.MetricsListen != "" {
		if l, err := net.Listen("tcp", o.MetricsListen); err != nil {
			// Warned, not failed: the worker itself may hold it (a check,
			// or a join to rotate credentials, while it runs).
			add("ports", Warn, "metrics %s: %v (the running worker's, or another program's?)", o.MetricsListen, err)
		} else {
			l.Close()
			add("ports", OK, "metrics %s free", o.MetricsListen)
		}
	}
	for _, f := range o.Files {
		out = append(out, FileCheck(f, false))
	}
	for _, f := range o.Secrets {
		out = append(out, FileCheck(f, true))
	}
	return out
}

// FileCheck checks a file that a root process will read: owned by root
// (or this user), writable by no one else, and for secrets, readable by
// no one else.
func FileCheck(path string, secret bool) Check {
	c := Check{Name: "files", Status: OK}
	fi, err := os.Stat(path)
	if err != nil {
		c.Status, c.Detail = Fail, err.Error()
		return c
	}
	var st unix.Stat_t
	_ = unix.Stat(path, &st)
	mode := fi.Mode().Perm()
	switch {
	case int(st.Uid) != os.Geteuid() && st.Uid != 0:
		c.Status, c.Detail = Fail, fmt.Sprintf("%s belongs to uid %d: whoever that is could change what the worker runs", path, st.Uid)
	case mode&0o022 != 0:
		c.Status, c.Detail = Fail, fmt.Sprintf("%s is writable by others (%#o): chmod go-w", path, mode)
	case secret && mode&0o077 != 0:
		c.Status, c.Detail = Fail, fmt.Sprintf("%s is a secret readable by others (%#o): chmod 600", path, mode)
	default:
		c.Detail = fmt.Sprintf("%s (%#o)", path, mode)
	}
	return c
}

func abs(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// existing is path or its nearest existing parent.
func existing(path string) string {
	for p := filepath.Clean(path); ; p = filepath.Dir(p) {
		if _, err := os.Stat(p); err == nil || p == "/" || p == "." {
			return p
		}
	}
}

func bridges() []string {
	m, _ := filepath.Glob("/sys/class/net/*/bridge")
	var out []string
	for _, p := range m {
		out = append(out, filepath.Base(filepath.Dir(p)))
	}
	return out
}

// Print writes the checks, one a line, and reports whether any failed.
func Print(w io.Writer, checks []Check) (failed bool) {
	for _, c := range checks {
		fmt.Fprintf(w, "%-4s  %-6s %s\n", c.Status, c.Name, c.Detail)
		failed = failed || c.Status == Fail
	}
	return failed
}

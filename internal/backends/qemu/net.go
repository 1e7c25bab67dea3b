package qemu

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

// ip runs iproute2's ip (through the wrapper) and returns its stdout.
func (b *Backend) ip(ctx context.Context, args ...string) ([]byte, error) {
	bin := b.opts.IPBinary
	if bin == "" {
		bin = "ip"
	}
	p, err := lookPathSbin(bin)
	if err != nil {
		return nil, fmt.Errorf("%s not found: %w; install iproute2", bin, err)
	}
	argv := append(append(append([]string{}, b.opts.Wrapper...), p), args...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// lookPathSbin is exec.LookPath that also tries the sbin directories a
// non-login PATH may lack.
func lookPathSbin(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err == nil || strings.Contains(name, "/") {
		return p, err
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		if st, serr := os.Stat(filepath.Join(d, name)); serr == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return filepath.Join(d, name), nil
		}
	}
	return "", err
}

// tapExists says whether a network device of that name exists.
func (b *Backend) tapExists(ctx context.Context, name string) bool {
	_, err := b.ip(ctx, "link", "show", "dev", name)
	return err == nil
}

// ensureTap creates the tap device (unless it is left from an earlier run)
// and enslaves it to the bridge. It reports whether it created it.
func (b *Backend) ensureTap(ctx context.Context, name, bridge string) (bool, error) {
	created := false
	if !b.tapExists(ctx, name) {
		if _, err := b.ip(ctx, "tuntap", "add", "dev", name, "mode", "tap"); err != nil {
			return false, fmt.Errorf("creating tap device %s (needs root or CAP_NET_ADMIN): %w", name, err)
		}
		created = true
	}
	if _, err := b.ip(ctx, "link", "set", "dev", name, "master", bridge, "up"); err != nil {
		if created {
			_ = b.deleteTap(ctx, name)
		}
		return false, fmt.Errorf("attaching tap device %s to bridge %s (does the bridge exist?): %w", name, bridge, err)
	}
	b.log.Info("tap device ready", "tap", name, "bridge", bridge, "created", created)
	return created, nil
}

// deleteTap removes the tap device if it exists.
func (b *Backend) deleteTap(ctx context.Context, name string) error {
	if !b.tapExists(ctx, name) {
		return nil
	}
	if _, err := b.ip(ctx, "link", "del", "dev", name); err != nil && b.tapExists(ctx, name) {
		return fmt.Errorf("deleting tap device %s: %w", name, err)
	}
	return nil
}

// GuestIP: user networking → 127.0.0.1 (the SSH forward is handle.SSHPort);
// tap → the neighbour whose link-layer address is this VM's MAC, else the
// newest dnsmasq lease for that MAC; none → ErrNoAddress.
func (b *Backend) GuestIP(ctx context.Context, h api.VmHandle) (string, error) {
	r, err := b.load(h)
	if err != nil {
		return "", fmt.Errorf("guest address of vm %s: %w", h.Name, err)
	}
	switch r.Handle.Spec.Network.Type {
	case api.NetworkUser:
		return "127.0.0.1", nil
	case api.NetworkTap:
		mac := strings.ToLower(r.Handle.MAC)
		if out, err := b.ip(ctx, "neigh", "show"); err == nil {
			if ip := neighIP(out, mac); ip != "" {
				return ip, nil
			}
		}
		for _, f := range b.opts.LeaseFiles {
			data, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			if ip := leaseIP(data, mac); ip != "" {
				return ip, nil
			}
		}
		return "", fmt.Errorf("guest address of vm %s: no neighbour entry or DHCP lease (searched %s) for MAC %s yet: %w",
			h.Name, strings.Join(b.opts.LeaseFiles, ", "), mac, backends.ErrNoAddress)
	default:
		return "", fmt.Errorf("guest address of vm %s: it has no network: %w", h.Name, backends.ErrNoAddress)
	}
}

// neighIP finds the IPv4 neighbour with link-layer address mac in
// "ip neigh show" output.
func neighIP(out []byte, mac string) string {
	s := bufio.NewScanner(bytes.NewReader(out))
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) < 2 {
			continue
		}
		ip := net.ParseIP(f[0])
		if ip == nil || ip.To4() == nil {
			continue
		}
		ok, bad := false, false
		for i := 1; i < len(f); i++ {
			switch f[i] {
			case "lladdr":
				if i+1 < len(f) && strings.EqualFold(f[i+1], mac) {
					ok = true
				}
			case "FAILED", "INCOMPLETE":
				bad = true
			}
		}
		if ok && !bad {
			return f[0]
		}
	}
	return ""
}

// leaseIP finds the newest lease for mac in a dnsmasq lease file
// ("<expiry> <mac> <ip> <hostname> <client-id>" per line).
func leaseIP(data []byte, mac string) string {
	best, bestExp := "", int64(-1)
	s := bufio.NewScanner(bytes.NewReader(data))
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) < 3 || !strings.EqualFold(f[1], mac) || net.ParseIP(f[2]) == nil {
			continue
		}
		exp, _ := strconv.ParseInt(f[0], 10, 64)
		if exp == 0 { // infinite lease
			exp = 1 << 62
		}
		if exp > bestExp {
			best, bestExp = f[2], exp
		}
	}
	return best
}

// ConsoleEndpoint is the serial console's unix socket and its log file.
func (b *Backend) ConsoleEndpoint(h api.VmHandle) (api.ConsoleEndpoint, error) {
	wd, err := b.workDir(h.Name)
	if err != nil {
		return api.ConsoleEndpoint{}, fmt.Errorf("console of vm %s: %w", h.Name, err)
	}
	return api.ConsoleEndpoint{
		Kind:    api.ConsoleUnixSocket,
		Path:    filepath.Join(wd, serialSock),
		LogPath: filepath.Join(wd, consoleLog),
	}, nil
}

package vmctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vmherd/vmherd/api"

	"github.com/spf13/cobra"
)

// parseForward reads [LOCAL:]GUESTPORT.
func parseForward(s string) (local, guest int, err error) {
	l, g, found := strings.Cut(s, ":")
	if !found {
		l, g = "0", s
	}
	local, err1 := strconv.Atoi(l)
	guest, err2 := strconv.Atoi(g)
	if err1 != nil || err2 != nil || local < 0 || local > 65535 || guest < 1 || guest > 65535 {
		return 0, 0, usageError("%q: want LOCALPORT:GUESTPORT or GUESTPORT (ports 1..65535; LOCALPORT 0 picks a free one)", s)
	}
	return local, guest, nil
}

func (g *globals) portForwardCmd() *cobra.Command {
	var address string
	c := &cobra.Command{
		Use:   "port-forward NAME [LOCALPORT:]GUESTPORT",
		Short: "forward a local TCP port to a port of the VM's guest, through NATS and the VM's worker, until interrupted",
		Long: `port-forward listens on --address:LOCALPORT and carries each connection to
GUESTPORT on the guest, over NATS through the worker of the VM's host, so it
works from any machine on the bus whatever the VM's network mode. With
user-mode networking (QEMU's default) only the guest's SSH port (22) is
reachable from its host; with tap or other networks, any port.`,
		Args:              cobra.ExactArgs(2),
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.noJSON(cmd); err != nil {
				return err
			}
			name := args[0]
			local, guest, err := parseForward(args[1])
			if err != nil {
				return err
			}
			host, err := g.relayHost(cmd.Context(), name)
			if err != nil {
				return err
			}
			ln, err := net.Listen("tcp", net.JoinHostPort(address, strconv.Itoa(local)))
			if err != nil {
				return err
			}
			return g.forward(cmd.Context(), ln, host, name, guest)
		},
	}
	c.Flags().StringVar(&address, "address", "127.0.0.1", "local address to listen on")
	return c
}

// forward serves ln until ctx ends: each connection gets a tunnel.
func (g *globals) forward(ctx context.Context, ln net.Listener, host, name string, guest int) error {
	fmt.Fprintf(g.errOut, "forwarding %s -> %s port %d (host %s); Ctrl-C stops\n", ln.Addr(), name, guest, host)
	go func() {
		<-ctx.Done()
		_ = ln.Close()
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go func() {
			if err := g.c.Tunnel(ctx, name, guest, conn); err != nil && ctx.Err() == nil {
				fmt.Fprintf(g.errOut, "vmctl: %s: %v\n", conn.RemoteAddr(), g.commandErr(err))
			}
		}()
	}
}

// stdio is this process's stdin and stdout as one connection.
type stdio struct{}

func (stdio) Read(p []byte) (int, error)  { return os.Stdin.Read(p) }
func (stdio) Write(p []byte) (int, error) { return os.Stdout.Write(p) }
func (stdio) CloseWrite() error           { return os.Stdout.Close() }
func (stdio) Close() error {
	_ = os.Stdin.Close()
	return os.Stdout.Close()
}

func (g *globals) proxyCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "proxy NAME GUESTPORT",
		Short: "connect stdin and stdout to a port of the VM's guest (for ssh's ProxyCommand)",
		Example: `  ssh -o ProxyCommand='vmctl proxy web1 22' root@web1
  vmctl ssh web1        # does this for you`,
		Args:              cobra.ExactArgs(2),
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.noJSON(cmd); err != nil {
				return err
			}
			_, guest, err := parseForward(args[1])
			if err != nil || strings.Contains(args[1], ":") {
				return usageError("GUESTPORT %q: want a port, 1..65535", args[1])
			}
			if _, err := g.relayHost(cmd.Context(), args[0]); err != nil {
				return err
			}
			return g.commandErr(g.c.Tunnel(cmd.Context(), args[0], guest, stdio{}))
		},
	}
}

func (g *globals) sshCmd() *cobra.Command {
	var user, identity string
	var port int
	c := &cobra.Command{
		Use:   "ssh NAME [-- SSH-ARGS...]",
		Short: "ssh into the VM's guest through NATS (the system ssh, with `vmctl proxy` as its ProxyCommand)",
		Long: `ssh runs the system's ssh client with a ProxyCommand that tunnels to the
guest's SSH port through NATS and the worker of the VM's host, so it works
from any machine on the bus. Arguments after -- go to ssh (a remote command,
-L forwards, -v ...). The guest's host key is checked against the keys
vmctl up learned for it; otherwise it is accepted on first use and pinned
for this incarnation of the VM (alias vmherd-NAME-HANDLEID) in vmherd's own
known-hosts file ($XDG_STATE_HOME/vmherd/known_hosts), never in yours: a
VM created again under the same name is a new host, not a changed one.`,
		Args:              cobra.MinimumNArgs(1),
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.noJSON(cmd); err != nil {
				return err
			}
			name := args[0]
			if _, err := g.relayHost(cmd.Context(), name); err != nil {
				return err
			}
			sshBin, err := exec.LookPath("ssh")
			if err != nil {
				return errors.New("vmctl ssh needs the ssh client (openssh-client); `vmctl port-forward` or `vmctl proxy` work without it")
			}
			self, err := os.Executable()
			if err != nil {
				return err
			}
			proxy := []string{self}
			proxy = append(proxy, g.connectionArgs()...)
			proxy = append(proxy, "proxy", name, strconv.Itoa(port))
			// The VM's generated key and the host keys first seen, when
			// vmctl up made and learned them (VM_SSH).
			known, key, cleanup, err := g.sshFiles(cmd.Context(), name)
			if err != nil {
				return err
			}
			defer cleanup()
			// The incarnation: its handle id (a new one for every prepare,
			// and for the copy a migration makes), unique across
			// installations that reuse names.
			inc := "0"
			if r, err := g.existing(cmd.Context(), name); err == nil && r != nil && r.Handle != nil && r.Handle.ID != "" {
				inc = r.Handle.ID
			}
			pins, err := knownHostsFile()
			if err != nil {
				return err
			}
			sargs := append([]string{"-o", "ProxyCommand=" + shellJoin(proxy)}, hostKeyArgs(name, inc, known, pins)...)
			if identity == "" {
				identity = key
			}
			if identity != "" {
				sargs = append(sargs, "-i", identity)
			}
			if user == "" {
				user = "root"
				if r, err := g.record(cmd.Context(), name); err == nil && r.Handle != nil && r.Handle.Spec != nil && r.Handle.Spec.SSH != nil && r.Handle.Spec.SSH.User != "" {
					user = r.Handle.Spec.SSH.User
				}
			}
			sargs = append(sargs, user+"@"+name)
			sargs = append(sargs, args[1:]...)
			c := exec.CommandContext(cmd.Context(), sshBin, sargs...)
			c.Stdin, c.Stdout, c.Stderr = os.Stdin, g.out, g.errOut
			err = c.Run()
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return &exitError{code: ee.ExitCode(), msg: ""}
			}
			return err
		},
	}
	c.Flags().StringVarP(&user, "user", "l", "", "user to log in as (default: the user the VM was created with, --ssh-user, else root)")
	c.Flags().StringVarP(&identity, "identity", "i", "", "private key file (default: ssh's own)")
	c.Flags().IntVar(&port, "port", 22, "the guest's SSH port")
	return c
}

// hostKeyArgs are ssh's host key options for an incarnation of VM name
// (its handle id): the keys VM_SSH learned (known), checked strictly; else the key
// first seen, pinned in vmherd's own known-hosts file (pins) under an
// alias naming the incarnation, never in the user's, so a new VM under
// an old name is a new host to ssh, not a changed one.
func hostKeyArgs(name, incarnation, known, pins string) []string {
	alias := "vmherd-" + name + "-" + incarnation
	if known != "" {
		return []string{"-o", "HostKeyAlias=vmherd-" + name, "-o", "UserKnownHostsFile=" + known, "-o", "StrictHostKeyChecking=yes"}
	}
	return []string{"-o", "HostKeyAlias=" + alias, "-o", "UserKnownHostsFile=" + pins, "-o", "StrictHostKeyChecking=accept-new"}
}

// knownHostsFile is vmherd's own known-hosts file,
// $XDG_STATE_HOME/vmherd/known_hosts (default ~/.local/state), its
// directory made private.
func knownHostsFile() (string, error) {
	dir := os.Getenv("XDG_STATE_HOME")
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("finding vmherd's known-hosts file: %w", err)
		}
		dir = filepath.Join(home, ".local", "state")
	}
	dir = filepath.Join(dir, "vmherd")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("making %s for vmherd's known-hosts file: %w", dir, err)
	}
	return filepath.Join(dir, "known_hosts"), nil
}

// connectionArgs are the global flags that reach the same NATS as this
// vmctl, for a vmctl it starts.
func (g *globals) connectionArgs() []string {
	a := []string{"--server", g.server, "--prefix", g.prefix}
	if g.creds != "" {
		a = append(a, "--creds", g.creds)
	}
	if g.tlsCA != "" {
		a = append(a, "--tls-ca", g.tlsCA)
	}
	return a
}

// shellJoin quotes args for ssh's ProxyCommand (run by a shell).
func shellJoin(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}

// sshFiles writes, for the system ssh, a known_hosts file with the VM's
// host keys as first seen and its generated private key, when VM_SSH has
// them (each "" when not).
func (g *globals) sshFiles(ctx context.Context, name string) (known, key string, cleanup func(), err error) {
	cleanup = func() {}
	kv, kerr := g.sshKV(ctx)
	if kerr != nil {
		return "", "", cleanup, nil // not allowed to read it, or an older engine: ssh's own
	}
	dir, err := os.MkdirTemp("", "vmctl-ssh-")
	if err != nil {
		return "", "", cleanup, err
	}
	cleanup = func() { _ = os.RemoveAll(dir) }
	r, err := g.existing(ctx, name)
	if err != nil || r == nil {
		return "", "", cleanup, err
	}
	if e, err := kv.Get(ctx, api.SSHKey(name, r.Generation, api.SSHHostKeys)); err == nil {
		var k knownHostKeys
		if json.Unmarshal(e.Value(), &k) == nil && len(k.Keys) > 0 {
			var b strings.Builder
			for _, l := range k.Keys {
				b.WriteString("vmherd-" + name + " " + l + "\n")
			}
			known = filepath.Join(dir, "known_hosts")
			if err := os.WriteFile(known, []byte(b.String()), 0o600); err != nil {
				return "", "", cleanup, err
			}
		}
	}
	if e, err := kv.Get(ctx, api.SSHKey(name, r.Generation, api.SSHPrivateKey)); err == nil {
		key = filepath.Join(dir, "id_ed25519")
		if err := os.WriteFile(key, e.Value(), 0o600); err != nil {
			return "", "", cleanup, err
		}
	}
	return known, key, cleanup, nil
}

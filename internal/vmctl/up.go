package vmctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"
	"golang.org/x/crypto/ssh"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/provision"
	"github.com/vmherd/vmherd/internal/vmfile"
)

// vmfileFlags are the flags up, down, reload and provision share.
type vmfileFlags struct {
	file   string
	name   string
	reads  bool // the command reads the files the VMFile names
	access vmfile.Access
}

func (f *vmfileFlags) add(c *cobra.Command) {
	c.Flags().StringVarP(&f.file, "file", "f", "VMFile.kdl", "the VMFile")
	c.Flags().StringVar(&f.name, "name", "", "only this VM of the file")
	if f.reads {
		c.Flags().StringArrayVar(&f.access.Allow, "allow-path", nil, "a directory whose files the VMFile may name besides its own directory (repeatable)")
		c.Flags().StringArrayVar(&f.access.Secrets, "allow-secret", nil, "a file that may go into a spec or guest although it looks like a private key or NATS credentials (repeatable)")
	}
}

// defs reads the VMFile and picks the VMs to act on; for a command that
// reads the files it names, they are confined first (vmfile.Check).
func (f *vmfileFlags) defs() ([]vmfile.Def, error) {
	file, err := vmfile.Parse(f.file)
	if err != nil {
		return nil, &exitError{code: ExitUsage, msg: err.Error()}
	}
	if f.reads {
		if err := file.Check(f.access); err != nil {
			return nil, &exitError{code: ExitUsage, msg: fmt.Sprintf("%s: %v", f.file, err)}
		}
	}
	if f.name == "" {
		return file.VMs, nil
	}
	d, ok := file.Find(f.name)
	if !ok {
		var names []string
		for _, v := range file.VMs {
			names = append(names, v.Name)
		}
		return nil, usageError("--name %s: %s defines %s", f.name, f.file, strings.Join(names, ", "))
	}
	return []vmfile.Def{*d}, nil
}

func (g *globals) upCmd() *cobra.Command {
	f := vmfileFlags{reads: true}
	var noProvision bool
	c := &cobra.Command{
		Use:   "up",
		Short: "create and start the VMs of a VMFile.kdl as defined, and provision new ones",
		Long: `up makes each VM of the VMFile exist and run as defined: a VM that does not
exist (or was destroyed) is created, started, and provisioned over SSH; one
that exists with the same definition is started if it is not running; one
whose definition changed is left alone and the differences are printed:
apply them with vmctl reload NAME (destroy and create again), since a VM's
spec is fixed when it is prepared. image-url images are pulled first (onto
the VM's host if it is pinned, else onto every alive host).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			defs, err := f.defs()
			if err != nil {
				return err
			}
			var drifted []string
			for _, d := range defs {
				changed, err := g.up(cmd.Context(), d, !noProvision)
				if err != nil {
					return err
				}
				if changed {
					drifted = append(drifted, d.Name)
				}
			}
			if len(drifted) > 0 {
				return &exitError{code: ExitFailed, msg: fmt.Sprintf("%s changed in the VMFile; apply with: vmctl reload --name %s", strings.Join(drifted, ", "), drifted[0])}
			}
			return nil
		},
	}
	f.add(c)
	c.Flags().BoolVar(&noProvision, "no-provision", false, "do not provision VMs up creates")
	return c
}

func (g *globals) downCmd() *cobra.Command {
	var f vmfileFlags
	var destroy bool
	c := &cobra.Command{
		Use:   "down",
		Short: "stop the VMs of a VMFile.kdl (--destroy: destroy them)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			defs, err := f.defs()
			if err != nil {
				return err
			}
			for _, d := range defs {
				r, err := g.existing(cmd.Context(), d.Name)
				if err != nil {
					return err
				}
				switch {
				case r == nil:
					g.printf("%s: does not exist\n", d.Name)
				case destroy:
					if _, err := g.send(cmd.Context(), d.Name, fsm.ActDestroy, api.Command{}); err != nil {
						return err
					}
				case fsm.Live(r.State):
					if _, err := g.send(cmd.Context(), d.Name, fsm.ActStop, api.Command{}); err != nil {
						return err
					}
				default:
					g.printf("%s: %s\n", d.Name, r.State)
				}
			}
			return nil
		},
	}
	f.add(c)
	c.Flags().BoolVar(&destroy, "destroy", false, "destroy the VMs (the engines then delete their generated keys)")
	return c
}

func (g *globals) reloadCmd() *cobra.Command {
	f := vmfileFlags{reads: true}
	var noProvision bool
	c := &cobra.Command{
		Use:   "reload",
		Short: "destroy the VMs of a VMFile.kdl and create them again as defined (and provision them)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			defs, err := f.defs()
			if err != nil {
				return err
			}
			for _, d := range defs {
				if r, err := g.existing(cmd.Context(), d.Name); err != nil {
					return err
				} else if r != nil {
					if _, err := g.send(cmd.Context(), d.Name, fsm.ActDestroy, api.Command{}); err != nil {
						return err
					}
				}
				if _, err := g.up(cmd.Context(), d, !noProvision); err != nil {
					return err
				}
			}
			return nil
		},
	}
	f.add(c)
	c.Flags().BoolVar(&noProvision, "no-provision", false, "do not provision")
	return c
}

func (g *globals) provisionCmd() *cobra.Command {
	f := vmfileFlags{reads: true}
	c := &cobra.Command{
		Use:   "provision",
		Short: "run the provision steps of a VMFile.kdl on its running VMs, over SSH through NATS",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			defs, err := f.defs()
			if err != nil {
				return err
			}
			for _, d := range defs {
				if err := g.provision(cmd.Context(), d); err != nil {
					return err
				}
			}
			return nil
		},
	}
	f.add(c)
	return c
}

// existing is the VM's record, nil when it does not exist (or was
// destroyed).
func (g *globals) existing(ctx context.Context, name string) (*api.VmRecord, error) {
	r, _, err := g.incarnation(ctx, name)
	return r, err
}

// incarnation is the VM's record (nil when it does not exist or was
// destroyed) and the generation its VM_SSH entries go under: the
// record's, or for a VM up is about to prepare, the next one.
func (g *globals) incarnation(ctx context.Context, name string) (*api.VmRecord, int, error) {
	r, err := g.record(ctx, name)
	var ee *exitError
	if errors.As(err, &ee) && ee.code == ExitFailed {
		return nil, 1, nil
	}
	if err != nil {
		return nil, 0, err
	}
	if !r.Live() {
		return nil, r.Generation + 1, nil
	}
	return r, r.Generation, nil
}

// up brings one VM to its definition; changed reports a definition that
// differs from the VM's.
func (g *globals) up(ctx context.Context, d vmfile.Def, provisionNew bool) (changed bool, err error) {
	r, gen, err := g.incarnation(ctx, d.Name)
	if err != nil {
		return false, err
	}
	spec, err := g.desired(ctx, d, gen)
	if err != nil {
		return false, err
	}
	if r != nil {
		have, err := g.acceptedSpec(ctx, d.Name)
		if err != nil {
			return false, err
		}
		if diffs := specDrift(have, spec, r.Host, d.Host); len(diffs) > 0 {
			fmt.Fprintf(g.errOut, "%s: the VMFile differs from the VM:\n", d.Name)
			for _, x := range diffs {
				fmt.Fprintf(g.errOut, "  %s\n", x)
			}
			return true, nil
		}
		switch r.State {
		case api.StateRunning:
			g.printf("%s: up to date and running\n", d.Name)
		case api.StateSuspended:
			_, err = g.send(ctx, d.Name, fsm.ActResume, api.Command{})
		default:
			_, err = g.send(ctx, d.Name, fsm.ActStart, api.Command{})
		}
		return false, err
	}
	if _, err := g.send(ctx, d.Name, fsm.ActPrepare, api.Command{Spec: &spec, Host: d.Host}); err != nil {
		return false, err
	}
	if _, err := g.send(ctx, d.Name, fsm.ActStart, api.Command{}); err != nil {
		return false, err
	}
	if provisionNew && len(d.Provision) > 0 {
		return false, g.provision(ctx, d)
	}
	return false, nil
}

// desired is the spec a definition asks for (pulling its image-url
// first; making the key of the VM's incarnation gen when it needs a
// generated one).
func (g *globals) desired(ctx context.Context, d vmfile.Def, gen int) (api.VmSpec, error) {
	spec := api.VmSpec{
		Name: d.Name, Backend: api.BackendTag(d.Backend), Vcpus: d.Vcpus, MemoryMB: d.MemoryMB, DiskGB: d.DiskGB, UEFI: d.UEFI,
		Labels: d.Labels,
	}
	n := d.Network
	spec.Network = &n
	switch {
	case d.ImageURL != "":
		name, err := g.ensureImage(ctx, d)
		if err != nil {
			return spec, err
		}
		spec.Image = name
	case strings.ContainsRune(d.Image, '/'):
		spec.ImagePath = d.Image
	default:
		spec.Image = d.Image
	}
	if ci := d.CloudInit; ci != nil {
		spec.CloudInit = &api.CloudInitConfig{Hostname: ci.Hostname}
		if ci.UserData != "" {
			b, err := os.ReadFile(ci.UserData)
			if err != nil {
				return spec, usageError("cloud-init user-data: %v", err)
			}
			spec.CloudInit.UserData = string(b)
		}
	}
	user := "vm"
	if d.SSH != nil {
		user = d.SSH.User
	}
	var pub string
	if d.CloudInit != nil && d.CloudInit.SSHKey != "" {
		k, err := readPublicKey(d.CloudInit.SSHKey)
		if err != nil {
			return spec, err
		}
		pub = k
	}
	if d.SSH != nil {
		signer, err := g.signer(ctx, d, gen)
		if err != nil {
			return spec, err
		}
		if pub == "" {
			pub = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey())))
		}
	}
	if pub != "" {
		spec.SSH = &api.SshConfig{User: user, PublicKey: pub}
	}
	if err := spec.Validate(); err != nil {
		return spec, usageError("vm %s: %s", d.Name, err)
	}
	return spec, nil
}

// sshKV opens VM_SSH.
func (g *globals) sshKV(ctx context.Context) (jetstream.KeyValue, error) {
	if err := g.conn(); err != nil {
		return nil, err
	}
	kv, err := g.js.KeyValue(ctx, g.names.SSHBucket())
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w (is the engine new enough to create it? it is readable by operators and admins only)", g.names.SSHBucket(), err)
	}
	return kv, nil
}

// signer is the key provisioning and vmctl ssh log in with: ssh's
// private-key, else the one generated for the VM's incarnation gen (made
// and kept in VM_SSH the first time; a new incarnation gets a new key,
// and the engines delete it when the incarnation is destroyed).
func (g *globals) signer(ctx context.Context, d vmfile.Def, gen int) (ssh.Signer, error) {
	if d.SSH.PrivateKey != "" {
		b, err := os.ReadFile(d.SSH.PrivateKey)
		if err != nil {
			return nil, usageError("ssh private-key: %v", err)
		}
		s, err := ssh.ParsePrivateKey(b)
		if err != nil {
			return nil, usageError("ssh private-key %s: %v (a key without a passphrase is needed)", d.SSH.PrivateKey, err)
		}
		return s, nil
	}
	kv, err := g.sshKV(ctx)
	if err != nil {
		return nil, err
	}
	key := api.SSHKey(d.Name, gen, api.SSHPrivateKey)
	if e, err := kv.Get(ctx, key); err == nil {
		return ssh.ParsePrivateKey(e.Value())
	}
	priv, _, err := provision.NewKey("vmherd@" + d.Name)
	if err != nil {
		return nil, err
	}
	if _, err := kv.Create(ctx, key, priv); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		return nil, fmt.Errorf("keeping %s's generated key: %w", d.Name, err)
	}
	e, err := kv.Get(ctx, key) // whoever created it first
	if err != nil {
		return nil, err
	}
	return ssh.ParsePrivateKey(e.Value())
}

// ensureImage pulls an image-url onto the VM's host (or every alive
// host), unless it is there already from the same source.
func (g *globals) ensureImage(ctx context.Context, d vmfile.Def) (string, error) {
	name := api.ImageNameFrom(d.ImageURL)
	hs, err := g.imageHosts(ctx, d.Host, d.Host == "")
	if err != nil {
		return "", err
	}
	sts, err := g.imageStatuses(ctx, "", name)
	if err != nil {
		return "", err
	}
	var need []string
	for _, h := range hs {
		if !slices.ContainsFunc(sts, func(s api.ImageStatus) bool {
			return s.Host == h && s.State == api.ImageReady && s.Source == d.ImageURL
		}) {
			need = append(need, h)
		}
	}
	if len(need) == 0 {
		return name, nil
	}
	return name, g.pull(ctx, need, api.ImagePullRequest{Source: d.ImageURL, Name: name})
}

// acceptedSpec is the spec of the VM's latest accepted prepare. It reads
// the VM's accepted events by direct gets, one after the other, and
// leaves no consumer on the server.
func (g *globals) acceptedSpec(ctx context.Context, name string) (*api.VmSpec, error) {
	st, err := g.js.Stream(ctx, g.names.EventsStream())
	if err != nil {
		return nil, err
	}
	subj := g.names.Event(name, api.TypeAccepted, api.EngineWriter)
	var spec *api.VmSpec
	for seq := uint64(1); ; {
		m, err := st.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subj))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return spec, nil
		}
		if err != nil {
			return nil, err
		}
		if ev, err := events.Decode(m.Data); err == nil && ev.Action == fsm.ActPrepare && ev.Spec != nil {
			spec = ev.Spec
		}
		seq = m.Sequence + 1
	}
}

// specDrift lists what differs between the VM's spec and the wanted one.
func specDrift(have *api.VmSpec, want api.VmSpec, haveHost, wantHost string) []string {
	if have == nil {
		return []string{"the VM's spec is unknown (no accepted prepare in its events)"}
	}
	h, w := have.WithDefaults(), want
	if w.Backend == "" {
		w.Backend = h.Backend
	}
	w = w.WithDefaults()
	var out []string
	diff := func(what string, a, b any) {
		if fmt.Sprint(a) != fmt.Sprint(b) {
			out = append(out, fmt.Sprintf("%s: %v -> %v", what, a, b))
		}
	}
	diff("image", h.Image+h.ImagePath, w.Image+w.ImagePath)
	diff("backend", h.Backend, w.Backend)
	diff("vcpus", h.Vcpus, w.Vcpus)
	diff("memory", h.MemoryMB, w.MemoryMB)
	diff("disk", h.DiskGB, w.DiskGB)
	diff("uefi", h.UEFI, w.UEFI)
	diff("labels", formatLabels(h.Labels), formatLabels(w.Labels))
	nh, nw := api.NetworkConfig{}, api.NetworkConfig{}
	if h.Network != nil {
		nh = *h.Network
	}
	if w.Network != nil {
		nw = *w.Network
	}
	diff("network", nh, nw)
	var ch, cw api.CloudInitConfig
	if h.CloudInit != nil {
		ch = *h.CloudInit
	}
	if w.CloudInit != nil {
		cw = *w.CloudInit
	}
	diff("cloud-init hostname", ch.Hostname, cw.Hostname)
	if ch.UserData != cw.UserData {
		out = append(out, "cloud-init user-data: changed")
	}
	var sh, sw api.SshConfig
	if h.SSH != nil {
		sh = *h.SSH
	}
	if w.SSH != nil {
		sw = *w.SSH
	}
	diff("ssh user", sh.User, sw.User)
	if sh.PublicKey != sw.PublicKey {
		out = append(out, "ssh key: changed")
	}
	if wantHost != "" {
		diff("host", haveHost, wantHost)
	}
	return out
}

// provisionWait bounds how long provisioning waits for the guest's host
// keys and SSH server after a start.
const provisionWait = 5 * time.Minute

// provision runs a definition's steps on its VM over SSH, through a
// tunnel over NATS, checking the guest's host key, and keeps the log in
// VM_SSH (vmctl log --provision).
func (g *globals) provision(ctx context.Context, d vmfile.Def) error {
	if len(d.Provision) == 0 {
		g.printf("%s: nothing to provision\n", d.Name)
		return nil
	}
	if d.SSH == nil {
		return usageError("vm %s has provision steps but no ssh block (hint: ssh { user \"vm\" })", d.Name)
	}
	r, err := g.existing(ctx, d.Name)
	if err != nil {
		return err
	}
	if r == nil || r.State != api.StateRunning {
		return &exitError{code: ExitFailed, msg: fmt.Sprintf("%s is not running; vmctl up first", d.Name)}
	}
	signer, err := g.signer(ctx, d, r.Generation)
	if err != nil {
		return err
	}
	hostKeys, err := g.hostKeys(ctx, r)
	if err != nil {
		return err
	}
	cfg := provision.ClientConfig(d.SSH.User, signer, hostKeys)
	client, closeTunnel, err := g.sshDial(ctx, r.Host, d.Name, cfg)
	if err != nil {
		return err
	}
	defer closeTunnel()
	defer client.Close()
	var log bytes.Buffer
	fmt.Fprintf(&log, "provisioning %s (%d steps) at %s\n", d.Name, len(d.Provision), time.Now().UTC().Format(time.RFC3339))
	perr := provision.Run(ctx, client, d.Provision, g.out, &log)
	if kv, err := g.sshKV(ctx); err == nil {
		b := log.Bytes()
		if len(b) > 512<<10 {
			b = append([]byte("[…]\n"), b[len(b)-512<<10:]...)
		}
		_, _ = kv.Put(ctx, api.SSHKey(d.Name, r.Generation, api.SSHProvisionLog), b)
	}
	if perr != nil {
		return &exitError{code: ExitFailed, msg: fmt.Sprintf("%s: %v", d.Name, perr)}
	}
	g.printf("%s: provisioned (%d steps)\n", d.Name, len(d.Provision))
	return nil
}

// knownHostKeys is what VM_SSH keeps of a guest's host keys.
type knownHostKeys struct {
	HandleID string   `json:"handle_id"`
	Keys     []string `json:"keys"`
}

// hostKeys returns the guest's host keys: as first seen for this
// incarnation (VM_SSH), else as its console shows them now (waiting for
// the boot to print them), kept for next time.
func (g *globals) hostKeys(ctx context.Context, r *api.VmRecord) ([]ssh.PublicKey, error) {
	kv, err := g.sshKV(ctx)
	if err != nil {
		return nil, err
	}
	handle := ""
	if r.Handle != nil {
		handle = r.Handle.ID
	}
	key := api.SSHKey(r.Name, r.Generation, api.SSHHostKeys)
	if e, err := kv.Get(ctx, key); err == nil {
		var k knownHostKeys
		if json.Unmarshal(e.Value(), &k) == nil && k.HandleID == handle {
			var out []ssh.PublicKey
			for _, l := range k.Keys {
				if pk, _, _, _, err := ssh.ParseAuthorizedKey([]byte(l)); err == nil {
					out = append(out, pk)
				}
			}
			if len(out) > 0 {
				return out, nil
			}
		}
	}
	var keys []ssh.PublicKey
	deadline := time.Now().Add(provisionWait)
	for {
		var log bytes.Buffer
		if err := g.c.Log(ctx, r.Name, &log, -1, false, nil); err != nil {
			return nil, g.commandErr(err)
		}
		if keys, err = provision.HostKeys(log.Bytes()); err == nil {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, fmt.Errorf("%s: %w", r.Name, err)
		}
		time.Sleep(time.Second)
	}
	k := knownHostKeys{HandleID: handle}
	for _, pk := range keys {
		k.Keys = append(k.Keys, strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pk))))
	}
	b, _ := json.Marshal(k)
	_, _ = kv.Put(ctx, key, b)
	return keys, nil
}

// sshDial logs in to the guest's port 22 through a tunnel over NATS,
// retrying while the guest's SSH server is not up yet.
func (g *globals) sshDial(ctx context.Context, host, name string, cfg *ssh.ClientConfig) (*ssh.Client, func(), error) {
	deadline := time.Now().Add(provisionWait)
	for {
		var conn net.Conn
		c, chans, reqs, err := func() (ssh.Conn, <-chan ssh.NewChannel, <-chan *ssh.Request, error) {
			dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			var err error
			if conn, err = g.c.DialGuest(dctx, name, 22); err != nil {
				return nil, nil, nil, fmt.Errorf("tunnel through host %s: %w", host, g.commandErr(err))
			}
			return ssh.NewClientConn(conn, name+":22", cfg)
		}()
		if err == nil {
			return ssh.NewClient(c, chans, reqs), func() { conn.Close() }, nil
		}
		if conn != nil {
			conn.Close()
		}
		if strings.Contains(err.Error(), "host key mismatch") {
			return nil, nil, fmt.Errorf("%s: %w", name, err)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, nil, fmt.Errorf("%s: logging in over SSH: %w", name, err)
		}
		time.Sleep(2 * time.Second)
	}
}

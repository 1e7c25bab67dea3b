package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/crypto/ssh"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/provision"
	"github.com/vmherd/vmherd/internal/vmfile"
)

// VMFileOptions say which VMs of a VMFile.kdl to act on and how.
type VMFileOptions struct {
	// Name: only this VM of the file ("" all).
	Name string
	// AllowPaths and AllowSecrets widen what local files the VMFile may
	// name (its own directory only, by default; docs/trust.md).
	AllowPaths, AllowSecrets []string
	// NoProvision: Up and Reload do not provision the VMs they create.
	NoProvision bool
	// Out gets what happens, one line per step, and the provisioning
	// steps' output (nil: discarded).
	Out io.Writer
	// Wait is passed to every command sent (WithProgress, ...).
	Wait []WaitOption
	// Sent, if set, is called with each command's outcome.
	Sent func(*Result, error)
}

// VMFileError is a VMFile that cannot be used: it does not parse, names
// files it may not, or has no VM of the name asked for.
type VMFileError struct{ Err error }

func (e *VMFileError) Error() string { return e.Err.Error() }
func (e *VMFileError) Unwrap() error { return e.Err }

// DriftError lists the VMs whose definition in the VMFile differs from
// the VM (a spec is fixed when a VM is prepared: Reload applies it).
type DriftError struct {
	VMs   []string
	Diffs map[string][]string
}

func (e *DriftError) Error() string {
	return fmt.Sprintf("%s changed in the VMFile; apply with reload (%s)", strings.Join(e.VMs, ", "), e.VMs[0])
}

// NotRunningError is a VM that must run for what was asked (provision).
type NotRunningError struct {
	VM    string
	State api.VmState
}

func (e *NotRunningError) Error() string {
	if e.State == "" {
		return fmt.Sprintf("%s does not exist; up first", e.VM)
	}
	return fmt.Sprintf("%s is not running (%s); up first", e.VM, e.State)
}

func (o VMFileOptions) out() io.Writer {
	if o.Out == nil {
		return io.Discard
	}
	return o.Out
}

func (o VMFileOptions) defs(file string, reads bool) ([]vmfile.Def, error) {
	f, err := vmfile.Parse(file)
	if err != nil {
		return nil, &VMFileError{err}
	}
	if reads {
		if err := f.Check(vmfile.Access{Allow: o.AllowPaths, Secrets: o.AllowSecrets}); err != nil {
			return nil, &VMFileError{fmt.Errorf("%s: %w", file, err)}
		}
	}
	if o.Name == "" {
		return f.VMs, nil
	}
	d, ok := f.Find(o.Name)
	if !ok {
		var names []string
		for _, v := range f.VMs {
			names = append(names, v.Name)
		}
		return nil, &VMFileError{fmt.Errorf("%s defines %s, not %s", file, strings.Join(names, ", "), o.Name)}
	}
	return []vmfile.Def{*d}, nil
}

func (c *Client) do(ctx context.Context, o VMFileOptions, name string, action api.Action, cmd api.Command) error {
	res, err := c.Do(ctx, name, action, cmd, o.Wait...)
	if o.Sent != nil {
		o.Sent(res, err)
	}
	return err
}

// Up makes each VM of the VMFile exist and run as defined: a VM that does
// not exist (or was destroyed) is created, started and provisioned over
// SSH; one that exists with the same definition is started (or resumed)
// if it is not running; one whose definition changed is left alone, and
// Up returns a *DriftError listing the differences (apply them with
// Reload: a VM's spec is fixed when it is prepared). image-url images are
// pulled first.
func (c *Client) Up(ctx context.Context, file string, o VMFileOptions) error {
	defs, err := o.defs(file, true)
	if err != nil {
		return err
	}
	drift := &DriftError{Diffs: map[string][]string{}}
	for _, d := range defs {
		diffs, err := c.up(ctx, d, o, !o.NoProvision)
		if err != nil {
			return err
		}
		if len(diffs) > 0 {
			drift.VMs = append(drift.VMs, d.Name)
			drift.Diffs[d.Name] = diffs
		}
	}
	if len(drift.VMs) > 0 {
		return drift
	}
	return nil
}

// Down stops the VMs of a VMFile (destroy: destroys them).
func (c *Client) Down(ctx context.Context, file string, destroy bool, o VMFileOptions) error {
	defs, err := o.defs(file, false)
	if err != nil {
		return err
	}
	for _, d := range defs {
		r, _, err := c.incarnation(ctx, d.Name)
		if err != nil {
			return err
		}
		switch {
		case r == nil:
			fmt.Fprintf(o.out(), "%s: does not exist\n", d.Name)
		case destroy:
			err = c.do(ctx, o, d.Name, api.ActDestroy, api.Command{})
		case fsm.Live(r.State):
			err = c.do(ctx, o, d.Name, api.ActStop, api.Command{})
		default:
			fmt.Fprintf(o.out(), "%s: %s\n", d.Name, r.State)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// Reload destroys the VMs of a VMFile and creates them again as defined
// (and provisions them).
func (c *Client) Reload(ctx context.Context, file string, o VMFileOptions) error {
	defs, err := o.defs(file, true)
	if err != nil {
		return err
	}
	for _, d := range defs {
		if r, _, err := c.incarnation(ctx, d.Name); err != nil {
			return err
		} else if r != nil {
			if err := c.do(ctx, o, d.Name, api.ActDestroy, api.Command{}); err != nil {
				return err
			}
		}
		if _, err := c.up(ctx, d, o, !o.NoProvision); err != nil {
			return err
		}
	}
	return nil
}

// Provision runs the provision steps of a VMFile's VMs on them (they must
// run), over SSH through the tunnel, checking the guest's host key, and
// keeps each log in VM_SSH (ProvisionLog).
func (c *Client) Provision(ctx context.Context, file string, o VMFileOptions) error {
	defs, err := o.defs(file, true)
	if err != nil {
		return err
	}
	for _, d := range defs {
		if err := c.provision(ctx, d, o); err != nil {
			return err
		}
	}
	return nil
}

// incarnation is the VM's record (nil when it does not exist or was
// destroyed) and the generation its VM_SSH entries go under: the
// record's, or for a VM about to be prepared, the next one.
func (c *Client) incarnation(ctx context.Context, name string) (*api.VmRecord, int, error) {
	r, err := c.Record(ctx, name)
	switch {
	case errors.Is(err, ErrNotFound):
		return nil, 1, nil
	case err != nil:
		return nil, 0, err
	case !r.Live():
		return nil, r.Generation + 1, nil
	}
	return r, r.Generation, nil
}

// up brings one VM to its definition, returning how it differs when it
// does.
func (c *Client) up(ctx context.Context, d vmfile.Def, o VMFileOptions, provisionNew bool) ([]string, error) {
	r, gen, err := c.incarnation(ctx, d.Name)
	if err != nil {
		return nil, err
	}
	spec, err := c.desired(ctx, d, gen, o)
	if err != nil {
		return nil, err
	}
	if r != nil {
		have, err := c.AcceptedSpec(ctx, d.Name)
		if err != nil {
			return nil, err
		}
		if diffs := specDrift(have, spec, r.Host, d.Host); len(diffs) > 0 {
			fmt.Fprintf(o.out(), "%s: the VMFile differs from the VM:\n", d.Name)
			for _, x := range diffs {
				fmt.Fprintf(o.out(), "  %s\n", x)
			}
			return diffs, nil
		}
		switch r.State {
		case api.StateRunning:
			fmt.Fprintf(o.out(), "%s: up to date and running\n", d.Name)
		case api.StateSuspended:
			err = c.do(ctx, o, d.Name, api.ActResume, api.Command{})
		default:
			err = c.do(ctx, o, d.Name, api.ActStart, api.Command{})
		}
		return nil, err
	}
	if err := c.do(ctx, o, d.Name, api.ActPrepare, api.Command{Spec: &spec, Host: d.Host}); err != nil {
		return nil, err
	}
	if err := c.do(ctx, o, d.Name, api.ActStart, api.Command{}); err != nil {
		return nil, err
	}
	if provisionNew && len(d.Provision) > 0 {
		return nil, c.provision(ctx, d, o)
	}
	return nil, nil
}

// desired is the spec a definition asks for (pulling its image-url
// first; making the key of the VM's incarnation gen when it needs a
// generated one).
func (c *Client) desired(ctx context.Context, d vmfile.Def, gen int, o VMFileOptions) (api.VmSpec, error) {
	spec := api.VmSpec{
		Name: d.Name, Backend: api.BackendTag(d.Backend), Vcpus: d.Vcpus, MemoryMB: d.MemoryMB, DiskGB: d.DiskGB, UEFI: d.UEFI,
		Labels: d.Labels,
	}
	n := d.Network
	spec.Network = &n
	switch {
	case d.ImageURL != "":
		name, err := c.ensureImage(ctx, d, o)
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
				return spec, &VMFileError{fmt.Errorf("cloud-init user-data: %w", err)}
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
		k, err := provision.ReadPublicKey(d.CloudInit.SSHKey)
		if err != nil {
			return spec, &VMFileError{fmt.Errorf("cloud-init ssh-key %w", err)}
		}
		pub = k
	}
	if d.SSH != nil {
		signer, err := c.signer(ctx, d, gen)
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
		return spec, &VMFileError{fmt.Errorf("vm %s: %w", d.Name, err)}
	}
	return spec, nil
}

// sshKV opens VM_SSH.
func (c *Client) sshKV(ctx context.Context) (jetstream.KeyValue, error) {
	kv, err := c.js.KeyValue(ctx, c.names.SSHBucket())
	if err != nil {
		return nil, notAllowed(fmt.Errorf("opening %s: %w (it is readable by operators and admins only)", c.names.SSHBucket(), err))
	}
	return kv, nil
}

// signer is the key provisioning and vmctl ssh log in with: ssh's
// private-key, else the one generated for the VM's incarnation gen (made
// and kept in VM_SSH the first time; a new incarnation gets a new key,
// and the engines delete it when the incarnation is destroyed).
func (c *Client) signer(ctx context.Context, d vmfile.Def, gen int) (ssh.Signer, error) {
	if d.SSH.PrivateKey != "" {
		b, err := os.ReadFile(d.SSH.PrivateKey)
		if err != nil {
			return nil, &VMFileError{fmt.Errorf("ssh private-key: %w", err)}
		}
		s, err := ssh.ParsePrivateKey(b)
		if err != nil {
			return nil, &VMFileError{fmt.Errorf("ssh private-key %s: %w (a key without a passphrase is needed)", d.SSH.PrivateKey, err)}
		}
		return s, nil
	}
	kv, err := c.sshKV(ctx)
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
		return nil, notAllowed(fmt.Errorf("keeping %s's generated key: %w", d.Name, err))
	}
	e, err := kv.Get(ctx, key) // whoever created it first
	if err != nil {
		return nil, err
	}
	return ssh.ParsePrivateKey(e.Value())
}

// ensureImage pulls an image-url onto the VM's host (or every alive
// host), unless it is there already from the same source.
func (c *Client) ensureImage(ctx context.Context, d vmfile.Def, o VMFileOptions) (string, error) {
	name := api.ImageNameFrom(d.ImageURL)
	hs, err := c.Hosts(ctx)
	if err != nil {
		return "", err
	}
	var targets []string
	for _, h := range hs {
		if h.Alive && (d.Host == "" || h.Host == d.Host) {
			targets = append(targets, h.Host)
		}
	}
	if len(targets) == 0 {
		return "", fmt.Errorf("no alive host to pull %s onto (pinned host: %q)", d.ImageURL, d.Host)
	}
	sts, err := c.Images(ctx, "", name)
	if err != nil {
		return "", err
	}
	var need []string
	for _, h := range targets {
		if !slices.ContainsFunc(sts, func(s api.ImageStatus) bool {
			return s.Host == h && s.State == api.ImageReady && s.Source == d.ImageURL
		}) {
			need = append(need, h)
		}
	}
	if len(need) == 0 {
		return name, nil
	}
	return name, c.PullAndWait(ctx, need, api.ImagePullRequest{Source: d.ImageURL, Name: name}, func(st api.ImageStatus) {
		switch st.State {
		case api.ImageReady:
			fmt.Fprintf(o.out(), "%s %s: ready\n", st.Host, st.Name)
		case api.ImageFailed:
			fmt.Fprintf(o.out(), "%s %s: failed: %s\n", st.Host, st.Name, st.Error)
		}
	})
}

// PullAndWait asks each host's worker to pull, and waits until every pull
// is ready or failed, calling fn (if not nil) with each status as it
// comes. A pull that failed somewhere is a *PullFailedError.
func (c *Client) PullAndWait(ctx context.Context, hosts []string, req api.ImagePullRequest, fn func(api.ImageStatus)) error {
	if req.Name == "" {
		req.Name = api.ImageNameFrom(req.Source)
	}
	started := time.Now()
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Watch before asking, so no status is missed.
	updates, err := c.ImageUpdates(wctx, req.Name, 250*time.Millisecond)
	if err != nil {
		return err
	}
	for _, h := range hosts {
		if err := c.PullImage(ctx, h, req); err != nil {
			return err
		}
	}
	pending := map[string]bool{}
	for _, h := range hosts {
		pending[h] = true
	}
	failures := map[string]string{}
	for len(pending) > 0 {
		st, ok := <-updates
		if !ok {
			return fmt.Errorf("stopped waiting for the pulls (they go on): %w", ctx.Err())
		}
		if !pending[st.Host] || st.Time.Before(started.Add(-time.Second)) {
			continue
		}
		if fn != nil {
			fn(st)
		}
		switch st.State {
		case api.ImageReady:
			delete(pending, st.Host)
		case api.ImageFailed:
			delete(pending, st.Host)
			failures[st.Host] = st.Error
		}
	}
	if len(failures) > 0 {
		return &PullFailedError{Name: req.Name, Failures: failures}
	}
	return nil
}

// AcceptedSpec is the spec of the VM's latest accepted prepare, read from
// its accepted events by direct gets.
func (c *Client) AcceptedSpec(ctx context.Context, name string) (*api.VmSpec, error) {
	store, err := c.eventStore(ctx)
	if err != nil {
		return nil, err
	}
	subj := c.names.Event(name, api.TypeAccepted, api.EngineWriter)
	var spec *api.VmSpec
	for seq := uint64(1); ; {
		m, err := store.Stream().GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subj))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return spec, nil
		}
		if err != nil {
			return nil, notAllowed(err)
		}
		if ev, err := events.Decode(m.Data); err == nil && ev.Action == api.ActPrepare && ev.Spec != nil && !events.RelayedCopy(m) {
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
	diff("labels", h.Labels, w.Labels) // fmt prints a map's keys in order
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
// VM_SSH.
func (c *Client) provision(ctx context.Context, d vmfile.Def, o VMFileOptions) error {
	if len(d.Provision) == 0 {
		fmt.Fprintf(o.out(), "%s: nothing to provision\n", d.Name)
		return nil
	}
	if d.SSH == nil {
		return &VMFileError{fmt.Errorf("vm %s has provision steps but no ssh block (hint: ssh { user \"vm\" })", d.Name)}
	}
	r, _, err := c.incarnation(ctx, d.Name)
	if err != nil {
		return err
	}
	if r == nil || r.State != api.StateRunning {
		e := &NotRunningError{VM: d.Name}
		if r != nil {
			e.State = r.State
		}
		return e
	}
	signer, err := c.signer(ctx, d, r.Generation)
	if err != nil {
		return err
	}
	hostKeys, err := c.GuestHostKeys(ctx, r)
	if err != nil {
		return err
	}
	cl, err := c.DialSSH(ctx, d.Name, provision.ClientConfig(d.SSH.User, signer, hostKeys), provisionWait)
	if err != nil {
		return err
	}
	defer cl.Close()
	var log bytes.Buffer
	fmt.Fprintf(&log, "provisioning %s (%d steps) at %s\n", d.Name, len(d.Provision), time.Now().UTC().Format(time.RFC3339))
	perr := provision.Run(ctx, cl, d.Provision, o.out(), &log)
	if kv, err := c.sshKV(ctx); err == nil {
		b := log.Bytes()
		if len(b) > 512<<10 {
			b = append([]byte("[…]\n"), b[len(b)-512<<10:]...)
		}
		_, _ = kv.Put(ctx, api.SSHKey(d.Name, r.Generation, api.SSHProvisionLog), b)
	}
	if perr != nil {
		return fmt.Errorf("%s: %w", d.Name, perr)
	}
	fmt.Fprintf(o.out(), "%s: provisioned (%d steps)\n", d.Name, len(d.Provision))
	return nil
}

// ProvisionLog is what VM_SSH keeps of the last provisioning of the VM's
// current incarnation.
func (c *Client) ProvisionLog(ctx context.Context, name string) ([]byte, error) {
	r, _, err := c.incarnation(ctx, name)
	if err != nil {
		return nil, err
	}
	if r == nil {
		return nil, &NotFoundError{VM: name}
	}
	kv, err := c.sshKV(ctx)
	if err != nil {
		return nil, err
	}
	e, err := kv.Get(ctx, api.SSHKey(name, r.Generation, api.SSHProvisionLog))
	if err != nil {
		return nil, fmt.Errorf("%s has no provisioning log (up or provision writes one): %w", name, err)
	}
	return e.Value(), nil
}

// knownHostKeys is what VM_SSH keeps of a guest's host keys.
type knownHostKeys struct {
	HandleID string   `json:"handle_id"`
	Keys     []string `json:"keys"`
}

// GuestHostKeys returns the guest's SSH host keys: as first seen for this
// incarnation (kept in VM_SSH), else as its console shows them now
// (waiting up to 5 minutes for the boot to print them), kept for next
// time.
func (c *Client) GuestHostKeys(ctx context.Context, r *api.VmRecord) ([]ssh.PublicKey, error) {
	kv, err := c.sshKV(ctx)
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
		if err := c.Log(ctx, r.Name, &log, -1, false, nil); err != nil {
			return nil, err
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

// DialSSH logs in to the guest's port 22 through the tunnel with cfg,
// trying again while the guest's SSH server is not up yet, for up to
// within. A host key that does not match cfg's is an error at once.
func (c *Client) DialSSH(ctx context.Context, name string, cfg *ssh.ClientConfig, within time.Duration) (*ssh.Client, error) {
	deadline := time.Now().Add(within)
	for {
		var conn net.Conn
		sc, chans, reqs, err := func() (ssh.Conn, <-chan ssh.NewChannel, <-chan *ssh.Request, error) {
			dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			var err error
			if conn, err = c.DialGuest(dctx, name, 22); err != nil {
				return nil, nil, nil, fmt.Errorf("tunnel: %w", err)
			}
			return ssh.NewClientConn(conn, name+":22", cfg)
		}()
		if err == nil {
			return ssh.NewClient(sc, chans, reqs), nil
		}
		if conn != nil {
			conn.Close()
		}
		if strings.Contains(err.Error(), "host key mismatch") {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, fmt.Errorf("%s: logging in over SSH: %w", name, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
}

// GuestSSH is what VM_SSH keeps for a VM's current incarnation.
type GuestSSH struct {
	// HostKeys are the guest's host keys as first seen (authorized_keys
	// lines); none when no one has looked yet.
	HostKeys []string
	// PrivateKey is the key generated for the VM (PEM); nil when the VM
	// was made with a key of its user's.
	PrivateKey []byte
}

// GuestSSH reads what VM_SSH keeps for the VM's current incarnation (an
// error for identities that may not read VM_SSH: readers).
func (c *Client) GuestSSH(ctx context.Context, name string) (*GuestSSH, error) {
	r, _, err := c.incarnation(ctx, name)
	if err != nil {
		return nil, err
	}
	if r == nil {
		return nil, &NotFoundError{VM: name}
	}
	kv, err := c.sshKV(ctx)
	if err != nil {
		return nil, err
	}
	out := &GuestSSH{}
	if e, err := kv.Get(ctx, api.SSHKey(name, r.Generation, api.SSHHostKeys)); err == nil {
		var k knownHostKeys
		if json.Unmarshal(e.Value(), &k) == nil {
			out.HostKeys = k.Keys
		}
	}
	if e, err := kv.Get(ctx, api.SSHKey(name, r.Generation, api.SSHPrivateKey)); err == nil {
		out.PrivateKey = e.Value()
	}
	return out, nil
}

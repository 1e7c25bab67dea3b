// Package propolis runs VMs on illumos hosts with Oxide's propolis-server
// (bhyve), through its HTTP API version 5.0.0.
//
// One propolis-server process serves one instance, so every VM gets its
// own server on its own address. A Provisioner supplies it: either a pool
// of already-running servers (Options.Servers, the configuration used on
// Linux and in tests), or, on illumos, the host provisioner that makes a
// zvol from the image, a VNIC, and starts `propolis-server run <bootrom>
// <ip:port>` per VM (NewHostProvisioner).
//
// The lifecycle maps onto the API like this:
//
//	prepare  provision the server (and host resources); nothing is created on it
//	start    PUT /instance (ensure, 201; the instance is Creating), then
//	         PUT /instance/state "Run", then wait for Running
//	stop     PUT /instance/state "Stop" (a hard halt: the API has no ACPI
//	         request), then wait for Destroyed
//	start    again: a new ensure, then Run
//	destroy  stop if needed, then release the server and host resources
//
// Propolis has no pause/resume: Suspend and Resume fail with
// backends.ErrUnsupported and Capabilities says so, so the engine rejects
// those commands before they reach a worker.
package propolis

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/google/uuid"

	"github.com/vmherd/vmherd/internal/backends"
	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
)

// Options configure the backend. Exactly one of Servers and Provisioner
// must be set.
type Options struct {
	// Servers are already-running propolis-servers (host:port), one VM
	// each: a VM gets the first one that runs no live instance.
	Servers []string
	// Provisioner creates per-VM servers and host resources
	// (NewHostProvisioner on illumos).
	Provisioner Provisioner
	// Host is this host's id, recorded in instance metadata (default: the
	// hostname).
	Host string
	// HTTPClient talks to the servers (default: a client whose deadlines
	// come from each call's context).
	HTTPClient *http.Client
	// RequestTimeout bounds one API request whose context has no deadline
	// (default 30s).
	RequestTimeout time.Duration
	// DestroyTimeout bounds the halt that precedes teardown (default 1m).
	DestroyTimeout time.Duration
	Log            *slog.Logger
}

// Backend is the propolis hypervisor backend.
type Backend struct {
	opts Options
	prov Provisioner
	hc   *http.Client

	mu  sync.Mutex
	vms map[string]api.VmHandle // by name: the current incarnation
}

var (
	_ backends.Hypervisor = (*Backend)(nil)
	_ backends.Capable    = (*Backend)(nil)
	_ backends.Adopter    = (*Backend)(nil)
	_ backends.Stater     = (*Backend)(nil)
)

// New returns a propolis backend.
func New(opts Options) (*Backend, error) {
	if (len(opts.Servers) == 0) == (opts.Provisioner == nil) {
		return nil, errors.New("propolis backend: give either already-running servers (--propolis-server) or host provisioning (illumos), not both or neither")
	}
	if opts.Host == "" {
		opts.Host, _ = os.Hostname()
	}
	if opts.HTTPClient == nil {
		opts.HTTPClient = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	}
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = 30 * time.Second
	}
	if opts.DestroyTimeout == 0 {
		opts.DestroyTimeout = time.Minute
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	b := &Backend{opts: opts, hc: opts.HTTPClient, vms: map[string]api.VmHandle{}}
	b.prov = opts.Provisioner
	if b.prov == nil {
		for _, a := range opts.Servers {
			if a == "" {
				return nil, errors.New("propolis backend: empty server address")
			}
		}
		b.prov = newStaticServers(opts.Servers, b.client)
	}
	return b, nil
}

func (b *Backend) client(addr string) *papi.Client {
	return papi.New(addr, papi.WithHTTPClient(b.hc), papi.WithTimeout(b.opts.RequestTimeout))
}

// Capabilities: propolis-server cannot pause or resume an instance.
// RemoteImages: with already-running servers (Options.Servers) the image
// path names a file on the server's machine, not the worker's.
func (b *Backend) RemoteImages() bool { return len(b.opts.Servers) > 0 }

func (b *Backend) Capabilities() api.Capabilities {
	return api.Capabilities{Suspend: false, Resume: false}
}

// lookup returns the current handle of h's VM, checking the incarnation.
func (b *Backend) lookup(h api.VmHandle) (api.VmHandle, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	cur, ok := b.vms[h.Name]
	if !ok || (h.ID != "" && cur.ID != h.ID) {
		return h, fmt.Errorf("propolis vm %s (handle %s): %w; prepare it first", h.Name, h.ID, backends.ErrNotFound)
	}
	return cur.Clone(), nil
}

func (b *Backend) store(h api.VmHandle) api.VmHandle {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.vms[h.Name] = h.Clone()
	return h
}

func (b *Backend) ensureInput(h api.VmHandle) ensureInput {
	p := placementOf(h)
	in := ensureInput{ID: dataOf(h).InstanceID, Host: b.opts.Host, DiskPath: p.DiskPath, VNIC: p.VNIC}
	if h.Spec != nil {
		in.Spec = *h.Spec
	}
	return in
}

// Prepare gives the VM its server (and, with host provisioning, its zvol
// and VNIC). Nothing is created on the server yet: that is Start's ensure.
// A spec the server would refuse (too many vCPUs, user-data too large for
// the 1 MiB request limit) fails here, before anything is made.
func (b *Backend) Prepare(ctx context.Context, spec api.VmSpec) (api.VmHandle, error) {
	if err := api.ValidateName(spec.Name); err != nil {
		return api.VmHandle{}, fmt.Errorf("preparing propolis vm: %w", err)
	}
	b.mu.Lock()
	cur, ok := b.vms[spec.Name]
	b.mu.Unlock()
	if ok {
		return cur.Clone(), nil
	}
	spec.Backend = api.BackendPropolis
	if spec.Vcpus == 0 {
		spec.Vcpus = api.DefaultVcpus
	}
	if spec.MemoryMB == 0 {
		spec.MemoryMB = api.DefaultMemoryMB
	}
	id := uuid.NewString()
	// Check the request the server will get, with the image standing in for
	// the disk, before provisioning anything.
	if _, _, err := buildEnsure(ensureInput{ID: id, Spec: spec, Host: b.opts.Host, DiskPath: spec.ImagePath, VNIC: "vnic"}); err != nil {
		return api.VmHandle{}, fmt.Errorf("preparing propolis vm %s: %w", spec.Name, err)
	}
	p, err := b.prov.Provision(ctx, spec.Name, spec)
	if err != nil {
		return api.VmHandle{}, fmt.Errorf("preparing propolis vm %s: %w", spec.Name, err)
	}
	s := spec
	h := withPlacement(withData(api.VmHandle{ID: id, Name: spec.Name, Backend: api.BackendPropolis, Spec: &s}, HandleData{InstanceID: id}), p)
	if _, _, err := buildEnsure(b.ensureInput(h)); err != nil {
		_ = b.prov.Release(context.WithoutCancel(ctx), spec.Name, p)
		return api.VmHandle{}, fmt.Errorf("preparing propolis vm %s: %w", spec.Name, err)
	}
	b.opts.Log.Info("propolis vm prepared", "vm", spec.Name, "instance", id, "server", p.Endpoint)
	return b.store(h).Clone(), nil
}

// observation is what a VM's server says about its instance.
type observation struct {
	none  bool // no instance was ever created on the server (424 NoInstance)
	ours  bool // the instance is this incarnation's
	inst  papi.Instance
	state papi.InstanceState
	err   error // the server did not answer GET /instance
	gone  bool  // with err: the server is known not to run
}

// observe reads the server's instance and says whether it is this VM's.
func (b *Backend) observe(ctx context.Context, h api.VmHandle) observation {
	inst, err := b.client(dataOf(h).Endpoint).Get(ctx)
	switch {
	case errors.Is(err, papi.ErrNoInstance):
		return observation{none: true}
	case err != nil:
		return observation{err: err, gone: b.prov.Gone(ctx, h.Name, placementOf(h))}
	}
	return observation{ours: inst.Properties.ID == dataOf(h).InstanceID, inst: inst, state: inst.State}
}

// Start creates the instance on the VM's server and runs it. After a stop
// the old instance is Destroyed, so a new one is created.
func (b *Backend) Start(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	cur, err := b.lookup(h)
	if err != nil {
		return h, err
	}
	p, err := b.prov.Ensure(ctx, cur.Name, placementOf(cur))
	if err != nil {
		return cur, fmt.Errorf("starting propolis vm %s: %w", cur.Name, err)
	}
	cur = b.store(withPlacement(cur, p))
	c := b.client(dataOf(cur).Endpoint)
	o := b.observe(ctx, cur)
	if o.err != nil {
		return cur, fmt.Errorf("starting propolis vm %s: %w", cur.Name, o.err)
	}
	needEnsure, needRun := o.none, false
	switch {
	case o.none:
	case !o.ours:
		if !o.state.Terminal() {
			return cur, fmt.Errorf("starting propolis vm %s: the propolis-server at %s runs instance %s (%q, %s), not this VM's %s; one server serves one instance",
				cur.Name, dataOf(cur).Endpoint, o.inst.Properties.ID, o.inst.Properties.Name, o.state, dataOf(cur).InstanceID)
		}
		needEnsure = true
	case o.state == papi.StateCreating:
		needRun = true // ensured earlier, never run (a start cut short)
	case o.state == papi.StateStopping || o.state == papi.StateStopped:
		if _, err := c.WaitFor(ctx, papi.StateDestroyed, papi.StateFailed); err != nil && !errors.Is(err, papi.ErrInstanceEnded) {
			return cur, fmt.Errorf("starting propolis vm %s: waiting for its previous run to end: %w", cur.Name, err)
		}
		needEnsure = true
	case o.state.Terminal():
		needEnsure = true
	default:
		// Starting, Running, Rebooting, Migrating, Repairing: it runs.
	}
	if needEnsure {
		req, _, err := buildEnsure(b.ensureInput(cur))
		if err != nil {
			return cur, fmt.Errorf("starting propolis vm %s: %w", cur.Name, err)
		}
		if err := c.Ensure(ctx, req); err != nil {
			return cur, fmt.Errorf("starting propolis vm %s: creating its instance: %w", cur.Name, err)
		}
		needRun = true
	}
	if needRun {
		if err := c.PutState(ctx, papi.RequestRun); err != nil {
			return cur, fmt.Errorf("starting propolis vm %s: asking its instance to run: %w", cur.Name, err)
		}
	}
	if _, err := c.WaitFor(ctx, papi.StateRunning); err != nil {
		return cur, fmt.Errorf("starting propolis vm %s: %w", cur.Name, err)
	}
	if needRun || cur.StartedAt.IsZero() {
		cur.StartedAt = time.Now().UTC()
	}
	b.opts.Log.Info("propolis vm running", "vm", cur.Name, "server", dataOf(cur).Endpoint, "ensured", needEnsure)
	return b.store(cur).Clone(), nil
}

// Stop halts the instance (propolis has no graceful stop in its API) and
// waits until it has run down to Destroyed.
func (b *Backend) Stop(ctx context.Context, h api.VmHandle, timeout time.Duration) (api.VmHandle, error) {
	cur, err := b.lookup(h)
	if err != nil {
		return h, err
	}
	if err := b.halt(ctx, cur, max(timeout, 5*time.Second)); err != nil {
		return cur, fmt.Errorf("stopping propolis vm %s: %w", cur.Name, err)
	}
	return cur, nil
}

// halt stops this incarnation's instance if it is live and waits for
// Destroyed. A server without an instance, or with another one, or known
// gone, has nothing of this VM running.
func (b *Backend) halt(ctx context.Context, cur api.VmHandle, timeout time.Duration) error {
	o := b.observe(ctx, cur)
	switch {
	case o.err != nil && o.gone:
		return nil
	case o.err != nil:
		return o.err
	case o.none || !o.ours || o.state.Terminal():
		return nil
	}
	c := b.client(dataOf(cur).Endpoint)
	if err := c.PutState(ctx, papi.RequestStop); err != nil && papi.StatusOf(err) != http.StatusFailedDependency {
		return fmt.Errorf("asking its instance to stop: %w", err)
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := c.WaitFor(wctx, papi.StateDestroyed, papi.StateFailed); err != nil {
		return fmt.Errorf("the instance did not halt within %s: %w", timeout, err)
	}
	return nil
}

// Destroy halts the VM if it runs, then releases its server and host
// resources. Destroying an unknown VM does nothing.
func (b *Backend) Destroy(ctx context.Context, h api.VmHandle) error {
	cur, err := b.lookup(h)
	if errors.Is(err, backends.ErrNotFound) {
		return nil
	}
	if err := b.halt(ctx, cur, b.opts.DestroyTimeout); err != nil {
		// A server nothing listens on runs no VM; anything else may still
		// run it, so keep the VM for a retry.
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("destroying propolis vm %s: %w", cur.Name, err)
		}
	}
	if err := b.prov.Release(ctx, cur.Name, placementOf(cur)); err != nil {
		return fmt.Errorf("destroying propolis vm %s: %w", cur.Name, err)
	}
	b.mu.Lock()
	if x, ok := b.vms[cur.Name]; ok && x.ID == cur.ID {
		delete(b.vms, cur.Name)
	}
	b.mu.Unlock()
	b.opts.Log.Info("propolis vm destroyed", "vm", cur.Name, "server", dataOf(cur).Endpoint)
	return nil
}

// Suspend is not supported: propolis-server has no pause.
func (b *Backend) Suspend(_ context.Context, h api.VmHandle) (api.VmHandle, error) {
	return h, fmt.Errorf("propolis vm %s: suspend: %w (propolis-server cannot pause an instance; stop and start it instead)", h.Name, backends.ErrUnsupported)
}

// Resume is not supported: propolis-server has no pause.
func (b *Backend) Resume(_ context.Context, h api.VmHandle) (api.VmHandle, error) {
	return h, fmt.Errorf("propolis vm %s: resume: %w (propolis-server cannot pause an instance; stop and start it instead)", h.Name, backends.ErrUnsupported)
}

// stateOf maps a propolis instance state to a VM state.
func stateOf(s papi.InstanceState) api.VmState {
	switch s {
	case papi.StateCreating:
		return api.StatePrepared // created, never run
	case papi.StateStarting:
		return api.StateStarting
	case papi.StateStopping:
		return api.StateStopping
	case papi.StateStopped, papi.StateDestroyed:
		return api.StateStopped
	case papi.StateFailed:
		return api.StateFailed
	default: // Running, Rebooting, Migrating, Repairing
		return api.StateRunning
	}
}

// State asks the VM's server. A VM whose instance is not (or no longer)
// on its server is prepared if it never ran, else stopped.
func (b *Backend) State(ctx context.Context, h api.VmHandle) (api.VmState, error) {
	cur, err := b.lookup(h)
	if err != nil {
		return "", err
	}
	idle := api.StateStopped
	if cur.StartedAt.IsZero() {
		idle = api.StatePrepared
	}
	o := b.observe(ctx, cur)
	switch {
	case o.err != nil && o.gone:
		return idle, nil
	case o.err != nil:
		return "", fmt.Errorf("propolis vm %s: %w", cur.Name, o.err)
	case o.none || !o.ours:
		return idle, nil
	}
	return stateOf(o.state), nil
}

// Adopt takes a VM back after a worker restart.
func (b *Backend) Adopt(ctx context.Context, h api.VmHandle, recorded api.VmState) (api.VmHandle, api.VmState, error) {
	if h.Name == "" || dataOf(h).InstanceID == "" || dataOf(h).Endpoint == "" {
		return h, "", fmt.Errorf("propolis vm %s: the handle has no instance or server to adopt: %w", h.Name, backends.ErrNotFound)
	}
	p, err := b.prov.Adopt(ctx, h.Name, placementOf(h))
	if err != nil {
		return h, "", fmt.Errorf("adopting propolis vm %s: %w", h.Name, err)
	}
	h = b.store(withPlacement(h, p))
	st, err := b.State(ctx, h)
	if err != nil {
		return h, recorded, err
	}
	return h.Clone(), st, nil
}

// guestIPer is implemented by provisioners that can find a guest's address.
type guestIPer interface {
	GuestIP(ctx context.Context, name string, p Placement) (string, error)
}

// Stats: not supported. propolis-server's instance API (instance,
// state, serial: what this backend drives) reports no CPU, memory, disk
// or network counters, and its process may run on another machine, so
// /proc cannot stand in.
func (b *Backend) Stats(_ context.Context, h api.VmHandle) (backends.Stats, error) {
	return backends.Stats{}, fmt.Errorf("live stats of vm %s: the propolis backend has none: propolis-server's instance API reports no CPU, memory, disk or network counters: %w", h.Name, backends.ErrUnsupported)
}

// GuestIP asks the provisioner (the host's ARP table, with host
// provisioning); propolis-server itself does not know guest addresses.
func (b *Backend) GuestIP(ctx context.Context, h api.VmHandle) (string, error) {
	cur, err := b.lookup(h)
	if err != nil {
		return "", err
	}
	if g, ok := b.prov.(guestIPer); ok {
		return g.GuestIP(ctx, cur.Name, placementOf(cur))
	}
	return "", fmt.Errorf("propolis vm %s: %w: propolis-server does not report guest addresses, and with an already-running server vmherd does not own the VNIC; look the address up on your network (DHCP leases, arp)", cur.Name, backends.ErrNoAddress)
}

// ConsoleEndpoint is the serial console WebSocket of the VM's server; the
// client must send the api-version header with the upgrade.
func (b *Backend) ConsoleEndpoint(h api.VmHandle) (api.ConsoleEndpoint, error) {
	endpoint := dataOf(h).Endpoint
	if endpoint == "" {
		cur, err := b.lookup(h)
		if err != nil {
			return api.ConsoleEndpoint{}, err
		}
		endpoint = dataOf(cur).Endpoint
	}
	return api.ConsoleEndpoint{
		Kind:    api.ConsoleWebSocket,
		URL:     b.client(endpoint).SerialURL(papi.HistoryQuery{}),
		Headers: map[string]string{papi.VersionHeader: papi.Version},
	}, nil
}

package propolis

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/vmherd/vmherd/api"

	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
)

// Placement is where a VM's own propolis-server listens and the host
// resources its instance spec refers to.
type Placement struct {
	Endpoint string // host:port of the VM's propolis-server, reachable from the worker
	PID      int    // the server's process, when this host runs it (else 0)
	DiskPath string // what the boot disk's file backend opens
	VNIC     string // the VNIC behind the NIC ("" for no NIC)
	MAC      string // the VNIC's MAC address, when known
	// Extra is the provisioner's bookkeeping (kept in the handle).
	Extra map[string]string
}

// Provisioner gives each VM its own propolis-server and the host resources
// its spec needs. Every method is idempotent.
type Provisioner interface {
	// Provision makes what the VM needs and returns where its server is.
	Provision(ctx context.Context, name string, spec api.VmSpec) (Placement, error)
	// Ensure makes sure the VM's server runs (restarting it if it died) and
	// returns the possibly updated placement.
	Ensure(ctx context.Context, name string, p Placement) (Placement, error)
	// Adopt takes ownership of a placement again after a worker restart.
	Adopt(ctx context.Context, name string, p Placement) (Placement, error)
	// Gone reports whether the VM's server is known not to run any more
	// (so no instance can be running there).
	Gone(ctx context.Context, name string, p Placement) bool
	// Release removes everything Provision made.
	Release(ctx context.Context, name string, p Placement) error
}

// Keys of the Extra map of the handle's data.
const (
	extraDisk = "disk_path"
	extraVNIC = "vnic"
	// extraPrefix marks the provisioner's own keys.
	extraPrefix = "prov."
)

// placementOf reads a placement back from a handle.
func placementOf(h api.VmHandle) Placement {
	d := dataOf(h)
	p := Placement{Endpoint: d.Endpoint, PID: h.PID, MAC: d.MAC, Extra: map[string]string{}}
	for k, v := range d.Extra {
		switch {
		case k == extraDisk:
			p.DiskPath = v
		case k == extraVNIC:
			p.VNIC = v
		case strings.HasPrefix(k, extraPrefix):
			p.Extra[strings.TrimPrefix(k, extraPrefix)] = v
		}
	}
	return p
}

// withPlacement records a placement in a handle.
func withPlacement(h api.VmHandle, p Placement) api.VmHandle {
	h = h.Clone()
	d := dataOf(h)
	h.PID = p.PID
	d.Endpoint, d.MAC = p.Endpoint, p.MAC
	extra := map[string]string{}
	for k, v := range d.Extra {
		if k != extraDisk && k != extraVNIC && !strings.HasPrefix(k, extraPrefix) {
			extra[k] = v
		}
	}
	if p.DiskPath != "" {
		extra[extraDisk] = p.DiskPath
	}
	if p.VNIC != "" {
		extra[extraVNIC] = p.VNIC
	}
	for k, v := range p.Extra {
		extra[extraPrefix+k] = v
	}
	if len(extra) == 0 {
		extra = nil
	}
	d.Extra = extra
	return withData(h, d)
}

// staticServers hands out already-running propolis-servers, one VM each.
// The boot disk is the spec's image as the server's host sees it and the
// NIC is an existing VNIC named in the spec: nothing is created on the host.
type staticServers struct {
	addrs  []string
	client func(addr string) *papi.Client

	mu    sync.Mutex
	owner map[string]string // address -> vm name
}

func newStaticServers(addrs []string, client func(string) *papi.Client) *staticServers {
	return &staticServers{addrs: addrs, client: client, owner: map[string]string{}}
}

// staticNIC is the VNIC of a spec on an already-running server.
func staticNIC(spec api.VmSpec) (string, error) {
	n := spec.Network
	if n == nil {
		return "", nil
	}
	switch n.Type {
	case api.NetworkNone:
		return "", nil
	case api.NetworkVnic:
		if n.Name == "" {
			return "", fmt.Errorf("%w: spec.network.name: name the existing VNIC to attach (with an already-running propolis-server vmherd creates none)", api.ErrInvalid)
		}
		return n.Name, nil
	default:
		return "", fmt.Errorf("%w: spec.network.type: %q networking does not exist on propolis; use {\"type\":\"vnic\",\"name\":\"<vnic>\"} or {\"type\":\"none\"}", api.ErrInvalid, n.Type)
	}
}

func (s *staticServers) Provision(ctx context.Context, name string, spec api.VmSpec) (Placement, error) {
	vnic, err := staticNIC(spec)
	if err != nil {
		return Placement{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, addr := range s.addrs {
		if o, ok := s.owner[addr]; ok && o != name {
			continue
		}
		inst, err := s.client(addr).Get(ctx)
		switch {
		case errors.Is(err, papi.ErrNoInstance):
		case err != nil:
			errs = append(errs, err)
			continue
		case !inst.State.Terminal():
			errs = append(errs, fmt.Errorf("propolis-server at %s already runs instance %s (%q, %s)", addr, inst.Properties.ID, inst.Properties.Name, inst.State))
			continue
		}
		s.owner[addr] = name
		return Placement{Endpoint: addr, DiskPath: spec.ImagePath, VNIC: vnic}, nil
	}
	switch len(errs) {
	case 0:
		return Placement{}, fmt.Errorf("no free propolis-server on this host: all %d (%s) serve other VMs; one server runs one VM, so destroy one or start more servers", len(s.addrs), strings.Join(s.addrs, ", "))
	case 1:
		return Placement{}, errs[0]
	}
	return Placement{}, fmt.Errorf("no usable propolis-server on this host: %w", errors.Join(errs...))
}

func (s *staticServers) Ensure(_ context.Context, _ string, p Placement) (Placement, error) {
	return p, nil
}

func (s *staticServers) Adopt(_ context.Context, name string, p Placement) (Placement, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if o, ok := s.owner[p.Endpoint]; ok && o != name {
		return p, fmt.Errorf("propolis-server at %s is already given to vm %s", p.Endpoint, o)
	}
	s.owner[p.Endpoint] = name
	return p, nil
}

func (s *staticServers) Gone(context.Context, string, Placement) bool { return false }

func (s *staticServers) Release(_ context.Context, name string, p Placement) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.owner[p.Endpoint] == name {
		delete(s.owner, p.Endpoint)
	}
	return nil
}

// portOf is the port of a host:port endpoint (0 if it has none).
func portOf(endpoint string) int {
	i := strings.LastIndexByte(endpoint, ':')
	if i < 0 {
		return 0
	}
	n, _ := strconv.Atoi(endpoint[i+1:])
	return n
}

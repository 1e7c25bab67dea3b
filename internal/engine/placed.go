package engine

import (
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/metrics"
)

// placedCount is what the VMs placed on each host take, counted from the
// records: a VM takes its vCPUs and memory on its host from its accepted
// prepare until it is destroyed (stopped VMs too: they may start at any
// time), unless its prepare failed (nothing was made that could start).
// Noop VMs run nothing and take nothing. It is fed the projector's
// folds and, at start, the bucket's records; a record only replaces an
// older one of the same VM, so the order of the two does not matter.
//
// Placements this engine decided and its projector has not folded yet
// count too (reserve), so that prepares decided at the same moment see
// each other: without them, a burst of prepares onto equal hosts would
// all see the same counts and pick the same host.
type placedCount struct {
	metrics *metrics.Set // VMs by state
	mu      sync.Mutex
	vms     map[string]placedVM
	byHost  map[string]api.Resources
	nOn     map[string]int // VMs by host
	pending map[string]pendingVM

	// placing is held from a prepare's choice of host to its reserve,
	// so that concurrent prepares choose one after the other.
	placing sync.Mutex
}

type placedVM struct {
	seq   uint64
	host  string
	res   api.Resources
	state api.VmState
}

// pendingVM is a placement decided on the VM's record at seq after, not
// yet folded.
type pendingVM struct {
	host  string
	res   api.Resources
	after uint64
	at    time.Time
}

// pendingFor bounds how long an unfolded placement counts: its decision
// is folded within milliseconds, and one whose append failed is decided
// again (and reserved again) by the command's redelivery.
const pendingFor = 10 * time.Second

func newPlacedCount(m *metrics.Set) *placedCount {
	return &placedCount{metrics: m, vms: map[string]placedVM{}, byHost: map[string]api.Resources{},
		nOn: map[string]int{}, pending: map[string]pendingVM{}}
}

// observe counts the newest record of a VM.
func (c *placedCount) observe(r *api.VmRecord) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p, ok := c.pending[r.Name]; ok && r.LastSeq > p.after {
		delete(c.pending, r.Name) // the placement's decision (or a later event) is folded
	}
	old, had := c.vms[r.Name]
	if had && r.LastSeq < old.seq {
		return
	}
	var now placedVM
	now.seq = r.LastSeq
	if r.Exists() {
		now.state = r.State
	}
	c.metrics.VMState(string(old.state), string(now.state))
	if r.Live() && r.Host != "" {
		now.host = r.Host
		if r.Backend != api.BackendNoop && !prepareFailed(r) {
			now.res = api.Resources{Vcpus: r.Vcpus, MemoryMB: r.MemoryMB}
		}
	}
	if had && old.host != "" {
		c.byHost[old.host] = c.byHost[old.host].Add(api.Resources{Vcpus: -old.res.Vcpus, MemoryMB: -old.res.MemoryMB})
		c.nOn[old.host]--
	}
	if now.host != "" {
		c.byHost[now.host] = c.byHost[now.host].Add(now.res)
		c.nOn[now.host]++
	}
	c.vms[r.Name] = now
	if !r.Exists() {
		delete(c.vms, r.Name) // purged (or never created): nothing to count
	}
}

// lockPlacing and unlockPlacing hold placing (admission's booking).
func (c *placedCount) lockPlacing()   { c.placing.Lock() }
func (c *placedCount) unlockPlacing() { c.placing.Unlock() }

// reserve counts a placement of name on host, decided on the VM's record
// at seq after, until a record of the VM past after is observed (or
// pendingFor passes). Callers hold placing.
func (c *placedCount) reserve(name, host string, b api.BackendTag, res api.Resources, after uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if b == api.BackendNoop {
		res = api.Resources{}
	}
	c.pending[name] = pendingVM{host: host, res: res, after: after, at: time.Now()}
}

// eachPending calls f with each unfolded placement, dropping stale ones.
// Callers hold mu.
func (c *placedCount) eachPending(f func(name string, p pendingVM)) {
	for name, p := range c.pending {
		if time.Since(p.at) > pendingFor {
			delete(c.pending, name)
			continue
		}
		f(name, p)
	}
}

// prepareFailed reports an incarnation whose prepare failed: it is failed
// and has no handle (a prepare that succeeded leaves one, and so does
// every later call). Nothing on its host can start; it still counts as
// a VM (quotas, vmsOn) until it is destroyed, but takes no room.
func prepareFailed(r *api.VmRecord) bool {
	return r.State == api.StateFailed && (r.Handle == nil || r.Handle.ID == "")
}

// vmsOn lists the VMs (not destroyed) the records place on host.
func (c *placedCount) vmsOn(host string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for name, v := range c.vms {
		if v.host == host {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// onHost counts the VMs (not destroyed) on host, the unfolded placements
// included.
func (c *placedCount) onHost(host string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nOn[host]
	c.eachPending(func(_ string, p pendingVM) {
		if p.host == host {
			n++
		}
	})
	return n
}

// withPrefix counts the VMs (not destroyed) whose names start with p, the
// unfolded placements included.
func (c *placedCount) withPrefix(p string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for name, v := range c.vms {
		if v.host != "" && strings.HasPrefix(name, p) {
			n++
		}
	}
	c.eachPending(func(name string, _ pendingVM) {
		if strings.HasPrefix(name, p) {
			n++
		}
	})
	return n
}

// on returns what the VMs placed on host take, the unfolded placements
// included.
func (c *placedCount) on(host string) api.Resources {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.byHost[host]
	c.eachPending(func(_ string, p pendingVM) {
		if p.host == host {
			r = r.Add(p.res)
		}
	})
	return r
}

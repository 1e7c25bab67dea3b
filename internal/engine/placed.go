package engine

import (
	"slices"
	"strings"
	"sync"

	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/metrics"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/vm"
)

// placedCount is what the VMs placed on each host take, counted from the
// records: a VM takes its vCPUs and memory on its host from its accepted
// prepare until it is destroyed (stopped VMs too: they may start at any
// time), unless its prepare failed (nothing was made that could start).
// Noop VMs run nothing and take nothing. It is fed the projector's
// folds and, at start, the bucket's records; a record only replaces an
// older one of the same VM, so the order of the two does not matter.
type placedCount struct {
	metrics *metrics.Set // VMs by state
	mu      sync.Mutex
	vms     map[string]placedVM
	byHost  map[string]hosts.Resources
}

type placedVM struct {
	seq   uint64
	host  string
	res   hosts.Resources
	state vm.VmState
}

func newPlacedCount(m *metrics.Set) *placedCount {
	return &placedCount{metrics: m, vms: map[string]placedVM{}, byHost: map[string]hosts.Resources{}}
}

// observe counts the newest record of a VM.
func (c *placedCount) observe(r *projection.VmRecord) {
	c.mu.Lock()
	defer c.mu.Unlock()
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
	if r.Exists() && r.State != vm.StateDestroyed && r.Host != "" {
		now.host = r.Host
		if r.Backend != vm.BackendNoop && !prepareFailed(r) {
			now.res = hosts.Resources{Vcpus: r.Vcpus, MemoryMB: r.MemoryMB}
		}
	}
	if had && old.host != "" {
		c.byHost[old.host] = c.byHost[old.host].Add(hosts.Resources{Vcpus: -old.res.Vcpus, MemoryMB: -old.res.MemoryMB})
	}
	if now.host != "" {
		c.byHost[now.host] = c.byHost[now.host].Add(now.res)
	}
	c.vms[r.Name] = now
}

// prepareFailed reports an incarnation whose prepare failed: it is failed
// and has no handle (a prepare that succeeded leaves one, and so does
// every later call). Nothing on its host can start; it still counts as
// a VM (quotas, vmsOn) until it is destroyed, but takes no room.
func prepareFailed(r *projection.VmRecord) bool {
	return r.State == vm.StateFailed && (r.Handle == nil || r.Handle.ID == "")
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

// onHost counts the VMs (not destroyed) on host.
func (c *placedCount) onHost(host string) int {
	return c.count(func(_ string, v placedVM) bool { return v.host == host })
}

// withPrefix counts the VMs (not destroyed) whose names start with p.
func (c *placedCount) withPrefix(p string) int {
	return c.count(func(name string, v placedVM) bool { return v.host != "" && strings.HasPrefix(name, p) })
}

// count counts the VMs for which keep holds.
func (c *placedCount) count(keep func(name string, v placedVM) bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for name, v := range c.vms {
		if keep(name, v) {
			n++
		}
	}
	return n
}

// on returns what the VMs placed on host take.
func (c *placedCount) on(host string) hosts.Resources {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.byHost[host]
}

// Package hosts is the VM_HOSTS bucket: worker heartbeats, cordons, and
// the engine's view of the hosts (alive or lost, cordoned or not), with
// placement by capacity.
package hosts

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
)

// Change is a change of a host's state the registry saw, for host events.
type Change struct {
	Kind api.HostEventType
	Host string
	// Rev identifies the change: the heartbeat's revision for lost and
	// back (the last beat before the loss, the first one after), the
	// cordon key's revision for cordoned and uncordoned, the deletion's
	// revision for forgotten.
	Rev    uint64
	Reason string
	Last   time.Time // the last heartbeat's time
}

// Registry watches VM_HOSTS and answers which hosts exist, which are
// alive (last heartbeat younger than LostAfter) and which are cordoned.
type Registry struct {
	LostAfter time.Duration
	mu        sync.RWMutex
	hosts     map[string]*api.Host
	lostSeen  map[string]bool // hosts whose loss was reported on changes
	ready     chan struct{}
	loaded    bool
	kv        jetstream.KeyValue
	changes   chan Change
}

// NewRegistry returns a registry; call Run to fill it.
func NewRegistry(lostAfter time.Duration) *Registry {
	return &Registry{
		LostAfter: lostAfter, hosts: map[string]*api.Host{}, lostSeen: map[string]bool{},
		ready: make(chan struct{}), changes: make(chan Change, 256),
	}
}

// Changes delivers the host changes seen after the initial load, and the
// losses of hosts found lost at any time from LostAfter after the start
// on (also hosts lost before it: the receiver keeps such reports
// idempotent, see engine host events).
func (r *Registry) Changes() <-chan Change { return r.changes }

// Run watches the bucket until ctx ends, watching again whenever a watch
// ends (a server restart can end one), and checks every second which
// hosts have stopped heartbeating.
func (r *Registry) Run(ctx context.Context, kv jetstream.KeyValue) error {
	r.mu.Lock()
	r.kv = kv
	r.mu.Unlock()
	once := sync.OnceFunc(func() {
		r.mu.Lock()
		r.loaded = true
		r.mu.Unlock()
		close(r.ready)
	})
	go r.checkLost(ctx)
	for ctx.Err() == nil {
		if err := r.watch(ctx, kv, once); err != nil && ctx.Err() == nil {
			time.Sleep(250 * time.Millisecond)
		}
	}
	return nil
}

func (r *Registry) checkLost(ctx context.Context) {
	select {
	case <-ctx.Done():
		return
	case <-r.ready:
	}
	// A registry that has just started reports no host lost until it has
	// watched for LostAfter: a host whose beats stopped while no engine
	// ran (restarting a single host stops its worker with its engine) gets
	// a whole LostAfter to beat again, so a restart adds no lost/back
	// pair. Liveness itself (Alive, Get) is not delayed.
	select {
	case <-ctx.Done():
		return
	case <-time.After(r.LostAfter):
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		r.checkLostOnce(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// checkLostOnce reads every host that looks lost directly from the bucket
// (a watch can lag or stall, as on a server restart, and every host would
// then look lost), and reports those still lost whose loss is not yet
// reported. The reads happen here, on the registry's own goroutine, so
// Get and List never do I/O.
func (r *Registry) checkLostOnce(ctx context.Context) {
	r.mu.RLock()
	var stale []string
	for name, h := range r.hosts {
		if h.Rev != 0 && time.Since(h.Time) >= r.LostAfter {
			stale = append(stale, name)
		}
	}
	r.mu.RUnlock()
	for _, name := range stale {
		r.refresh(ctx, name)
	}
	r.mu.Lock()
	var lost []Change
	for _, name := range stale {
		h, ok := r.hosts[name]
		if !ok || h.Rev == 0 || r.lostSeen[name] || time.Since(h.Time) < r.LostAfter {
			continue
		}
		r.lostSeen[name] = true
		lost = append(lost, Change{Kind: api.HostLost, Host: name, Rev: h.Rev, Last: h.Time,
			Reason: fmt.Sprintf("no heartbeat for over %s", r.LostAfter)})
	}
	r.mu.Unlock()
	for _, c := range lost {
		r.emit(c)
	}
}

func (r *Registry) emit(c Change) {
	select {
	case r.changes <- c:
	default: // nobody listening (tests): host events are a notification
	}
}

func (r *Registry) watch(ctx context.Context, kv jetstream.KeyValue, ready func()) error {
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watching hosts: %w", err)
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("host watch ended")
			}
			if e == nil {
				ready()
				continue
			}
			r.apply(e)
		}
	}
}

func (r *Registry) apply(e jetstream.KeyValueEntry) {
	r.mu.Lock()
	var out []Change
	defer func() {
		r.mu.Unlock()
		for _, c := range out {
			r.emit(c)
		}
	}()
	key := e.Key()
	put := e.Operation() == jetstream.KeyValuePut
	// Keys are <host> and <host>.cordon. Operators may write any
	// *.cordon key (a permission cannot say "a host id"), so one whose
	// host part is not a host id (`_engine`, 3,000 characters) is refused
	// here: it names no host, makes no host event and is never listed.
	if api.ValidateHost(strings.TrimSuffix(key, api.CordonSuffix)) != nil {
		return
	}
	if name, ok := strings.CutSuffix(key, api.CordonSuffix); ok {
		h := r.entry(name)
		if e.Revision() <= h.CordonRev {
			return
		}
		h.CordonRev = e.Revision()
		was := h.Cordon != nil
		h.Cordon = nil
		if put {
			var c api.Cordon
			if json.Unmarshal(e.Value(), &c) == nil {
				h.Cordon = &c
			}
		}
		if r.loaded && was != (h.Cordon != nil) {
			ch := Change{Kind: api.HostUncordoned, Host: name, Rev: e.Revision()}
			if h.Cordon != nil {
				ch.Kind, ch.Reason = api.HostCordoned, h.Cordon.Reason
			}
			out = append(out, ch)
		}
		return
	}
	// A heartbeat speaks for the host its key names, and only for it: the
	// key is what the server's permissions pin (a worker may put only
	// $KV.VM_HOSTS.<its host>); the body is whatever the writer chose. A
	// key that is no host id (no worker can have written it) is ignored.
	if api.ValidateHost(key) != nil {
		return
	}
	h := r.entry(key)
	if e.Revision() <= h.Rev {
		return
	}
	if !put {
		if r.loaded && h.Rev != 0 {
			out = append(out, Change{Kind: api.HostForgotten, Host: key, Rev: e.Revision(), Last: h.Time})
		}
		if h.Cordon == nil {
			delete(r.hosts, key)
		} else {
			h.Heartbeat, h.Rev = api.Heartbeat{}, 0
		}
		delete(r.lostSeen, key)
		return
	}
	var hb api.Heartbeat
	if json.Unmarshal(e.Value(), &hb) != nil {
		return
	}
	// A body that does not name the key's host is not its heartbeat (a
	// worker of h2 claiming to be h1, or a JetStream API answer the server
	// was made to publish on the key, package origin): the entry is
	// ignored, and the host keeps what it last said itself.
	if hb.Host != key {
		return
	}
	// Judge liveness by when the server stored the beat, not by the
	// worker's clock.
	hb.Time = e.Created()
	h.Heartbeat, h.Rev = hb, e.Revision()
	if time.Since(hb.Time) < r.LostAfter && r.lostSeen[key] {
		delete(r.lostSeen, key)
		out = append(out, Change{Kind: api.HostBack, Host: key, Rev: e.Revision(), Last: hb.Time})
	}
}

// entry returns the host's entry, making it. Callers hold r.mu.
func (r *Registry) entry(name string) *api.Host {
	h := r.hosts[name]
	if h == nil {
		h = &api.Host{}
		h.Host = name
		r.hosts[name] = h
	}
	return h
}

// refresh reads one host's heartbeat directly, for when the watch may lag.
func (r *Registry) refresh(ctx context.Context, host string) {
	r.mu.RLock()
	kv := r.kv
	r.mu.RUnlock()
	if kv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if e, err := kv.Get(ctx, host); err == nil {
		r.apply(e)
	}
}

// Ready is closed once the initial values are loaded.
func (r *Registry) Ready() <-chan struct{} { return r.ready }

// Get returns a copy of what is known of a host (nil: never heartbeated,
// or forgotten). It reads the registry's memory only, kept by its watch
// (and by the direct reads of hosts that look lost, checkLostOnce), so
// callers that must not block, as the engine's admission, may call it.
func (r *Registry) Get(host string) *api.Host { return r.get(host) }

func (r *Registry) get(host string) *api.Host {
	r.mu.RLock()
	defer r.mu.RUnlock()
	h, ok := r.hosts[host]
	if !ok || h.Rev == 0 {
		return nil
	}
	return r.view(h)
}

// view copies h with Alive computed now. Callers hold r.mu.
func (r *Registry) view(h *api.Host) *api.Host {
	c := *h
	c.Alive = time.Since(h.Time) < r.LostAfter
	return &c
}

// List returns every known host (alive or lost), sorted by name.
func (r *Registry) List() []*api.Host {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]*api.Host, 0, len(r.hosts))
	for _, h := range r.hosts {
		if h.Rev != 0 {
			out = append(out, r.view(h))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Host < out[j].Host })
	return out
}

// Alive reports whether a host is alive (from memory, as Get).
func (r *Registry) Alive(host string) bool {
	h := r.Get(host)
	return h != nil && h.Alive
}

// Placement is a request for a host: the backend asked for ("" for any,
// the host's default then applies) and what the VM takes.
type Placement struct {
	Backend api.BackendTag
	Need    api.Resources
	// Placed tells what the VMs already placed on a host take (the
	// engine's count from the records).
	Placed func(host string) api.Resources
	// MaxVMs (if > 0) is the most VMs a host may have; VMsOn counts them.
	MaxVMs int
	VMsOn  func(host string) int
	// Image (if set) must be ready in the host's image store; HasImage
	// tells (nil: nowhere).
	Image    string
	HasImage func(host, name string) bool
}

// takes reports whether a VM of backend b takes capacity: a Noop VM runs
// nothing, so it takes none.
func takes(b api.BackendTag) bool { return b != api.BackendNoop }

// Fits reports why host h cannot take the placement ("" if it can).
func (p Placement) Fits(h *api.Host) string {
	switch {
	case !h.Alive:
		return "lost"
	case h.Cordon != nil:
		return "cordoned"
	case p.Backend != "" && !h.Has(p.Backend):
		return fmt.Sprintf("no %s backend (it has %v)", p.Backend, h.Backends)
	case p.MaxVMs > 0 && p.VMsOn != nil && p.VMsOn(h.Host) >= p.MaxVMs:
		return fmt.Sprintf("full (%d VMs, --max-vms-per-host %d)", p.VMsOn(h.Host), p.MaxVMs)
	case p.Image != "" && (p.HasImage == nil || !p.HasImage(h.Host, p.Image)):
		return fmt.Sprintf("no image %s (vmctl image pull SOURCE --name %s --host %s)", p.Image, p.Image, h.Host)
	}
	b := p.Backend
	if b == "" {
		b = h.DefaultBackend
	}
	if !takes(b) {
		return ""
	}
	free := h.Capacity
	if p.Placed != nil {
		used := p.Placed(h.Host)
		free.Vcpus -= used.Vcpus
		free.MemoryMB -= used.MemoryMB
	}
	switch {
	case p.Need.Vcpus > free.Vcpus:
		return fmt.Sprintf("needs %d vCPUs, %d of %d free", p.Need.Vcpus, max(free.Vcpus, 0), h.Capacity.Vcpus)
	case p.Need.MemoryMB > free.MemoryMB:
		return fmt.Sprintf("needs %d MiB memory, %d of %d free", p.Need.MemoryMB, max(free.MemoryMB, 0), h.Capacity.MemoryMB)
	}
	return ""
}

// Best picks, among hosts, the one that fits with the most free memory;
// of hosts with equal free memory (equal hosts, or Noop VMs, which take
// none), the one with the fewest VMs (VMsOn), then the first by name, so
// that equal hosts share the VMs instead of the first taking them all. A
// spec that names no backend gets its host's default backend, so it goes
// to a host whose default is a real hypervisor when there is one: Noop is
// for tests, and a Noop-only host must not take a VM that a QEMU or
// Propolis host could run. When no host fits, the error says why each
// host was passed over.
func Best(hs []*api.Host, p Placement) (*api.Host, error) {
	var best *api.Host
	var bestFree, bestVMs int
	vms := func(h *api.Host) int {
		if p.VMsOn == nil {
			return 0
		}
		return p.VMsOn(h.Host)
	}
	var why []string
	for _, h := range hs {
		if reason := p.Fits(h); reason != "" {
			why = append(why, h.Host+": "+reason)
			continue
		}
		free := h.Capacity.MemoryMB
		if p.Placed != nil {
			free -= p.Placed(h.Host).MemoryMB
		}
		if best != nil && p.Backend == "" {
			real, bestReal := takes(h.DefaultBackend), takes(best.DefaultBackend)
			if real != bestReal {
				if real {
					best, bestFree, bestVMs = h, free, vms(h)
				}
				continue
			}
		}
		n := vms(h)
		if best == nil || free > bestFree || free == bestFree && (n < bestVMs || n == bestVMs && h.Host < best.Host) {
			best, bestFree, bestVMs = h, free, n
		}
	}
	if best != nil {
		return best, nil
	}
	if len(hs) == 0 {
		return nil, errors.New("no host has heartbeated: start a worker (or the engine with --with-worker)")
	}
	return nil, fmt.Errorf("no host can take it (%s)", strings.Join(why, "; "))
}

// DefaultLostAfter is the engine's default --host-timeout: a host whose
// last heartbeat is older is lost. Clients that judge liveness themselves
// (vmctl) use it too.
const DefaultLostAfter = 10 * time.Second

// Snapshot reads the bucket once and returns every known host, judged
// alive or lost by lostAfter. It reads with direct gets (events.KVEntries),
// so a client that may only read the bucket can call it.
func Snapshot(ctx context.Context, js events.KVReader, bucket string, lostAfter time.Duration) ([]*api.Host, error) {
	es, err := events.KVEntries(ctx, js, bucket, "")
	if err != nil {
		return nil, fmt.Errorf("reading hosts: %w", err)
	}
	r := NewRegistry(lostAfter)
	for _, e := range es {
		r.apply(e)
	}
	return r.List(), nil
}

// Read returns what the bucket says of one host (nil: it never
// heartbeated, or was forgotten), judged alive or lost by lostAfter: two
// direct gets, its heartbeat and its cordon.
func Read(ctx context.Context, kv jetstream.KeyValue, lostAfter time.Duration, host string) (*api.Host, error) {
	r := NewRegistry(lostAfter)
	for _, k := range []string{host, api.CordonKey(host)} {
		e, err := kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("reading host entry %s: %w", k, err)
		}
		r.apply(e)
	}
	if hs := r.List(); len(hs) > 0 {
		return hs[0], nil
	}
	return nil, nil
}

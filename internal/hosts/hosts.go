// Package hosts is the VM_HOSTS bucket: worker heartbeats and the engine's
// view of which hosts are alive.
package hosts

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/vm"
)

// Heartbeat is a worker's entry in VM_HOSTS.
type Heartbeat struct {
	Host           string                                  `json:"host"`
	Version        string                                  `json:"version"`
	Time           time.Time                               `json:"time"`
	Backends       []vm.BackendTag                         `json:"backends"`
	DefaultBackend vm.BackendTag                           `json:"default_backend"`
	Capabilities   map[vm.BackendTag]backends.Capabilities `json:"capabilities"`
	Capacity       Resources                               `json:"capacity"`
	Usage          Usage                                   `json:"usage"`
}

// Resources a host offers.
type Resources struct {
	Vcpus    int `json:"vcpus"`
	MemoryMB int `json:"memory_mb"`
}

// Usage is what the host's VMs take.
type Usage struct {
	VMs      int `json:"vms"`
	Vcpus    int `json:"vcpus"`
	MemoryMB int `json:"memory_mb"`
}

// FreeMemoryMB is capacity minus usage.
func (h *Heartbeat) FreeMemoryMB() int { return h.Capacity.MemoryMB - h.Usage.MemoryMB }

// Has reports whether the host runs backend b.
func (h *Heartbeat) Has(b vm.BackendTag) bool {
	for _, x := range h.Backends {
		if x == b {
			return true
		}
	}
	return false
}

// Can reports whether backend b on this host supports action.
func (h *Heartbeat) Can(b vm.BackendTag, action fsm.Action) bool {
	c, ok := h.Capabilities[b]
	if !ok {
		return true
	}
	switch action {
	case fsm.ActSuspend:
		return c.Suspend
	case fsm.ActResume:
		return c.Resume
	}
	return true
}

// Registry watches VM_HOSTS and answers which hosts are alive: those whose
// last heartbeat is younger than LostAfter.
type Registry struct {
	LostAfter time.Duration
	mu        sync.RWMutex
	hosts     map[string]*Heartbeat
	ready     chan struct{}
	kv        jetstream.KeyValue
}

// NewRegistry returns a registry; call Run to fill it.
func NewRegistry(lostAfter time.Duration) *Registry {
	return &Registry{LostAfter: lostAfter, hosts: map[string]*Heartbeat{}, ready: make(chan struct{})}
}

// Run watches the bucket until ctx ends, watching again whenever a watch
// ends (a server restart can end one).
func (r *Registry) Run(ctx context.Context, kv jetstream.KeyValue) error {
	r.mu.Lock()
	r.kv = kv
	r.mu.Unlock()
	once := sync.OnceFunc(func() { close(r.ready) })
	for ctx.Err() == nil {
		if err := r.watch(ctx, kv, once); err != nil && ctx.Err() == nil {
			time.Sleep(250 * time.Millisecond)
		}
	}
	return nil
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
	defer r.mu.Unlock()
	if e.Operation() != jetstream.KeyValuePut {
		delete(r.hosts, e.Key())
		return
	}
	var hb Heartbeat
	if json.Unmarshal(e.Value(), &hb) == nil {
		// Judge liveness by when the server stored the beat, not by the
		// worker's clock.
		hb.Time = e.Created()
		r.hosts[e.Key()] = &hb
	}
}

// refresh reads one host's entry directly, for when the watch may lag.
func (r *Registry) refresh(host string) {
	r.mu.RLock()
	kv := r.kv
	r.mu.RUnlock()
	if kv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if e, err := kv.Get(ctx, host); err == nil {
		r.apply(e)
	}
}

// Ready is closed once the initial values are loaded.
func (r *Registry) Ready() <-chan struct{} { return r.ready }

// Get returns a host's last heartbeat and whether it is alive. A host
// that looks lost is read again directly before it is called lost.
func (r *Registry) Get(host string) (*Heartbeat, bool) {
	hb, alive := r.get(host)
	if !alive {
		r.refresh(host)
		hb, alive = r.get(host)
	}
	return hb, alive
}

func (r *Registry) get(host string) (*Heartbeat, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	hb, ok := r.hosts[host]
	if !ok {
		return nil, false
	}
	return hb, time.Since(hb.Time) < r.LostAfter
}

// Alive lists the hosts that are alive, sorted by name.
func (r *Registry) Alive() []*Heartbeat {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []*Heartbeat
	for _, hb := range r.hosts {
		if time.Since(hb.Time) < r.LostAfter {
			out = append(out, hb)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Host < out[j].Host })
	return out
}

// Place picks the alive host with the most free memory that has backend b
// (any backend when b is empty: the host's default then applies, and
// hosts whose default is not Noop come first; see Best).
func (r *Registry) Place(b vm.BackendTag) (*Heartbeat, error) {
	best := r.place(b)
	if best == nil {
		r.mu.RLock()
		known := make([]string, 0, len(r.hosts))
		for h := range r.hosts {
			known = append(known, h)
		}
		r.mu.RUnlock()
		for _, h := range known {
			r.refresh(h)
		}
		best = r.place(b)
	}
	if best == nil {
		if b == "" {
			return nil, fmt.Errorf("no alive host: start a worker (or the engine with --with-worker)")
		}
		return nil, fmt.Errorf("no alive host has the %s backend: start a worker with --backends including %s", b, b)
	}
	return best, nil
}

func (r *Registry) place(b vm.BackendTag) *Heartbeat {
	return Best(r.Alive(), b)
}

// Best picks, among alive hosts, the one with the most free memory that
// has backend b. A spec that names no backend gets its host's default
// backend, so it goes to a host whose default is a real hypervisor when
// there is one: Noop is for tests, and a Noop-only host must not take a VM
// that a QEMU or Propolis host could run.
func Best(alive []*Heartbeat, b vm.BackendTag) *Heartbeat {
	var best *Heartbeat
	better := func(hb *Heartbeat) bool {
		if best == nil {
			return true
		}
		if b == "" {
			real, bestReal := hb.DefaultBackend != vm.BackendNoop, best.DefaultBackend != vm.BackendNoop
			if real != bestReal {
				return real
			}
		}
		return hb.FreeMemoryMB() > best.FreeMemoryMB()
	}
	for _, hb := range alive {
		if b != "" && !hb.Has(b) {
			continue
		}
		if better(hb) {
			best = hb
		}
	}
	return best
}

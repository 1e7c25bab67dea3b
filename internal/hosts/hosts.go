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
func (h *Heartbeat) Can(b vm.BackendTag, action string) bool {
	c, ok := h.Capabilities[b]
	if !ok {
		return true
	}
	switch action {
	case "suspend":
		return c.Suspend
	case "resume":
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
}

// NewRegistry returns a registry; call Run to fill it.
func NewRegistry(lostAfter time.Duration) *Registry {
	return &Registry{LostAfter: lostAfter, hosts: map[string]*Heartbeat{}, ready: make(chan struct{})}
}

// Run watches the bucket until ctx ends.
func (r *Registry) Run(ctx context.Context, kv jetstream.KeyValue) error {
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watching hosts: %w", err)
	}
	defer w.Stop()
	once := sync.OnceFunc(func() { close(r.ready) })
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return nil
			}
			if e == nil {
				once()
				continue
			}
			r.mu.Lock()
			if e.Operation() != jetstream.KeyValuePut {
				delete(r.hosts, e.Key())
			} else {
				var hb Heartbeat
				if json.Unmarshal(e.Value(), &hb) == nil {
					// Judge liveness by when the server stored the beat,
					// not by the worker's clock.
					hb.Time = e.Created()
					r.hosts[e.Key()] = &hb
				}
			}
			r.mu.Unlock()
		}
	}
}

// Ready is closed once the initial values are loaded.
func (r *Registry) Ready() <-chan struct{} { return r.ready }

// ErrHostLost: the host's worker stopped heartbeating.
var ErrHostLost = errors.New("host is not alive")

// Get returns a host's last heartbeat and whether it is alive.
func (r *Registry) Get(host string) (*Heartbeat, bool) {
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
// (any backend when b is empty; the host's default then applies).
func (r *Registry) Place(b vm.BackendTag) (*Heartbeat, error) {
	var best *Heartbeat
	for _, hb := range r.Alive() {
		if b != "" && !hb.Has(b) {
			continue
		}
		if best == nil || hb.FreeMemoryMB() > best.FreeMemoryMB() {
			best = hb
		}
	}
	if best == nil {
		if b == "" {
			return nil, fmt.Errorf("no alive host: start a worker (or the engine with --with-worker)")
		}
		return nil, fmt.Errorf("no alive host has the %s backend: start a worker with --backends including %s", b, b)
	}
	return best, nil
}

package api

import "time"

// Heartbeat is a worker's entry in VM_HOSTS.
type Heartbeat struct {
	Host           string                      `json:"host"`
	Version        string                      `json:"version"`
	Time           time.Time                   `json:"time"`
	Backends       []BackendTag                `json:"backends"`
	DefaultBackend BackendTag                  `json:"default_backend"`
	Capabilities   map[BackendTag]Capabilities `json:"capabilities"`
	Capacity       Resources                   `json:"capacity"`
	Usage          Usage                       `json:"usage"`
	// Tasks is how the worker wants its task consumer, which the engines
	// create for it.
	Tasks TaskSettings `json:"tasks"`
}

// TaskSettings are a worker's wishes for its host's task consumer.
type TaskSettings struct {
	AckWaitMS     int64 `json:"ack_wait_ms"`
	MaxAckPending int   `json:"max_ack_pending"`
}

// AckWait is the ack wait asked for (default 30 s).
func (t TaskSettings) AckWait() time.Duration {
	if t.AckWaitMS <= 0 {
		return 30 * time.Second
	}
	return time.Duration(t.AckWaitMS) * time.Millisecond
}

// Pending is the max ack pending asked for (default 256).
func (t TaskSettings) Pending() int {
	if t.MaxAckPending <= 0 {
		return 256
	}
	return t.MaxAckPending
}

// Resources a host offers, or a VM takes.
type Resources struct {
	Vcpus    int `json:"vcpus"`
	MemoryMB int `json:"memory_mb"`
}

// Add returns r + o.
func (r Resources) Add(o Resources) Resources {
	return Resources{Vcpus: r.Vcpus + o.Vcpus, MemoryMB: r.MemoryMB + o.MemoryMB}
}

// Usage is what the host's VMs take, as the worker counts them.
type Usage struct {
	VMs      int `json:"vms"`
	Vcpus    int `json:"vcpus"`
	MemoryMB int `json:"memory_mb"`
}

// Has reports whether the host runs backend b.
func (h *Heartbeat) Has(b BackendTag) bool {
	for _, x := range h.Backends {
		if x == b {
			return true
		}
	}
	return false
}

// Can reports whether backend b on this host supports action.
func (h *Heartbeat) Can(b BackendTag, action Action) bool {
	c, ok := h.Capabilities[b]
	if !ok {
		return true
	}
	switch action {
	case ActSuspend:
		return c.Suspend
	case ActResume:
		return c.Resume
	case ActMigrate:
		return c.Migrate
	}
	return true
}

// Cordon is the value of key <host>.cordon in VM_HOSTS: while it exists,
// no new VM is placed on the host.
type Cordon struct {
	Time   time.Time `json:"time"`
	Reason string    `json:"reason,omitempty"`
}

// CordonKey is the VM_HOSTS key of a host's cordon. Host ids have no dots,
// so it never collides with a heartbeat key.
func CordonKey(host string) string { return host + CordonSuffix }

// CordonSuffix ends every cordon key in VM_HOSTS.
const CordonSuffix = ".cordon"

// Host is what the registry knows of one host.
type Host struct {
	Heartbeat
	// Rev is the bucket revision of the heartbeat (0: none seen).
	Rev uint64 `json:"rev"`
	// Alive: the heartbeat is younger than the registry's LostAfter. Time
	// is when the server stored it, not the worker's clock.
	Alive  bool    `json:"alive"`
	Cordon *Cordon `json:"cordon,omitempty"`
	// CordonRev is the bucket revision of the cordon key (put or delete).
	CordonRev uint64 `json:"-"`
}

// Status is alive or lost, with ",cordoned" when cordoned.
func (h *Host) Status() string {
	s := "lost"
	if h.Alive {
		s = "alive"
	}
	if h.Cordon != nil {
		s += ",cordoned"
	}
	return s
}

// Capabilities says which lifecycle actions a backend supports. Workers
// publish them in their heartbeat; the engine rejects what a backend cannot do.
type Capabilities struct {
	Suspend bool `json:"suspend"`
	Resume  bool `json:"resume"`
	// Migrate: the backend moves VMs to and from other hosts (Migrator).
	Migrate bool `json:"migrate,omitempty"`
}

package api

import (
	"encoding/json"
	"fmt"
	"maps"
	"time"
)

// BackendTag names a hypervisor backend.
type BackendTag string

const (
	BackendNoop     BackendTag = "noop"
	BackendQEMU     BackendTag = "qemu"
	BackendPropolis BackendTag = "propolis"
)

// Backends lists every backend vmherd knows, in a stable order.
var Backends = []BackendTag{BackendNoop, BackendQEMU, BackendPropolis}

// ParseBackend turns a user string into a BackendTag.
func ParseBackend(s string) (BackendTag, error) {
	for _, b := range Backends {
		if string(b) == s {
			return b, nil
		}
	}
	return "", fmt.Errorf("%w: unknown backend %q (known: noop, qemu, propolis)", ErrInvalid, s)
}

// NetworkType is the tag of a NetworkConfig.
type NetworkType string

const (
	NetworkUser NetworkType = "user" // QEMU slirp with an SSH port forward
	NetworkTap  NetworkType = "tap"  // a TAP device enslaved to Bridge
	NetworkVnic NetworkType = "vnic" // an illumos VNIC (Propolis)
	NetworkNone NetworkType = "none" // no NIC
)

// NetworkConfig is tagged by "type": {"type":"user"}, {"type":"tap","bridge":"br0"},
// {"type":"vnic","name":"vnic0"}, {"type":"none"}.
type NetworkConfig struct {
	Type   NetworkType `json:"type"`
	Bridge string      `json:"bridge,omitempty"` // tap only
	Name   string      `json:"name,omitempty"`   // vnic only (an existing VNIC, or the one to create)
	Link   string      `json:"link,omitempty"`   // vnic only: the physical link to create the VNIC over
}

// CloudInitConfig is the NoCloud seed given to the guest.
type CloudInitConfig struct {
	UserData      string `json:"user_data,omitempty"`
	NetworkConfig string `json:"network_config,omitempty"`
	InstanceID    string `json:"instance_id,omitempty"` // default: the VM name
	Hostname      string `json:"hostname,omitempty"`    // default: the VM name
}

// SshConfig is the user created in the guest when no user-data is given.
type SshConfig struct {
	User      string `json:"user,omitempty"`
	PublicKey string `json:"public_key,omitempty"`
}

// VmSpec is what a prepare command asks for.
type VmSpec struct {
	Name      string     `json:"name,omitempty"`
	Backend   BackendTag `json:"backend,omitempty"`
	ImagePath string     `json:"image_path,omitempty"`
	// Image names an image in the host's image store instead (vmctl
	// image pull); the worker resolves it to its file.
	Image     string           `json:"image,omitempty"`
	Vcpus     int              `json:"vcpus,omitempty"`
	MemoryMB  int              `json:"memory_mb,omitempty"`
	DiskGB    int              `json:"disk_gb,omitempty"`
	UEFI      bool             `json:"uefi,omitempty"`
	Network   *NetworkConfig   `json:"network,omitempty"`
	CloudInit *CloudInitConfig `json:"cloud_init,omitempty"`
	SSH       *SshConfig       `json:"ssh,omitempty"`
	// Accel picks the QEMU accelerator: auto (default), kvm or tcg.
	Accel string `json:"accel,omitempty"`
	// Labels are the user's metadata about the VM (team=ci, job=1234):
	// folded into its record for listing and filtering, never given to
	// the guest or the hypervisor. See ValidateLabels for the rules.
	Labels map[string]string `json:"labels,omitempty"`
}

// Defaults applied when a spec leaves a field out.
const (
	DefaultVcpus    = 1
	DefaultMemoryMB = 512
)

// WithDefaults returns the spec with unset sizes filled in, and, once the
// backend is known, the network: user networking for QEMU and Noop, a VNIC
// of its own for Propolis (which has no user-mode networking).
func (s VmSpec) WithDefaults() VmSpec {
	if s.Vcpus == 0 {
		s.Vcpus = DefaultVcpus
	}
	if s.MemoryMB == 0 {
		s.MemoryMB = DefaultMemoryMB
	}
	if s.Network == nil && s.Backend != "" {
		if s.Backend == BackendPropolis {
			s.Network = &NetworkConfig{Type: NetworkVnic}
		} else {
			s.Network = &NetworkConfig{Type: NetworkUser}
		}
	}
	return s
}

// ConsoleKind says how to reach a VM's serial console.
type ConsoleKind string

const (
	ConsoleUnixSocket ConsoleKind = "unix-socket"
	ConsoleWebSocket  ConsoleKind = "websocket"
	ConsoleNone       ConsoleKind = "none"
)

// ConsoleEndpoint is a unix socket path (QEMU serial), a WebSocket URL
// (Propolis) or none (Noop).
type ConsoleEndpoint struct {
	Kind ConsoleKind `json:"kind"`
	Path string      `json:"path,omitempty"` // unix-socket
	URL  string      `json:"url,omitempty"`  // websocket
	// Headers the client must send (Propolis wants api-version).
	Headers map[string]string `json:"headers,omitempty"`
	// LogPath is the file the console is copied to, when there is one.
	LogPath string `json:"log_path,omitempty"`
}

// VmHandle is what a backend knows about one incarnation of a VM. ID changes
// each time the VM is prepared, so an observation about an older incarnation
// can be told apart from one about the current one.
//
// It holds only what every backend has and the rest of vmherd reads. What
// one backend alone needs (QEMU's sockets and forwarded port, Propolis's
// server address) is in Data, which that backend writes and reads and
// everything else carries unread, as Nomad's drivers keep their TaskState:
// a new backend adds no field here. What is worth showing of it, the
// backend says through the worker's state query (StateReply.Details).
type VmHandle struct {
	ID      string     `json:"id"`
	Name    string     `json:"name"`
	Backend BackendTag `json:"backend"`
	Host    string     `json:"host,omitempty"`
	PID     int        `json:"pid,omitempty"`
	WorkDir string     `json:"work_dir,omitempty"`
	// Spec is the spec this incarnation was prepared from.
	Spec      *VmSpec   `json:"spec,omitempty"`
	StartedAt time.Time `json:"started_at,omitzero"`
	// Data is the backend's own data about the incarnation, a JSON object
	// only the backend named by Backend reads.
	Data json.RawMessage `json:"data,omitempty"`
}

// legacyHandle holds the backend fields handles had at the top level before
// Data (up to fe6422d's successors): events, tasks and records stored then
// still carry them. The set is frozen; no field is ever added here.
type legacyHandle struct {
	Accel      string            `json:"accel,omitempty"`
	QMPSocket  string            `json:"qmp_socket,omitempty"`
	SerialSock string            `json:"serial_socket,omitempty"`
	SerialLog  string            `json:"serial_log,omitempty"`
	VNC        string            `json:"vnc,omitempty"`
	MAC        string            `json:"mac,omitempty"`
	SSHPort    int               `json:"ssh_port,omitempty"`
	TapDevice  string            `json:"tap_device,omitempty"`
	Endpoint   string            `json:"endpoint,omitempty"`
	InstanceID string            `json:"instance_id,omitempty"`
	Extra      map[string]string `json:"extra,omitempty"`
}

// UnmarshalJSON decodes a handle, and a handle stored before Data existed
// the same way: its top-level backend fields (accel, qmp_socket, ...,
// endpoint, instance_id, extra) become Data, an object with those keys,
// which is what the QEMU and Propolis backends' data use. So no reader,
// and no backend, knows the old form: it is turned into the new one here,
// once. A handle with Data ignores any such field.
func (h *VmHandle) UnmarshalJSON(b []byte) error {
	type plain VmHandle // without this method
	h.Data = nil        // a reused handle keeps no data of its last decode
	if err := json.Unmarshal(b, (*plain)(h)); err != nil {
		return err
	}
	if string(h.Data) == "null" {
		h.Data = nil
	}
	if len(h.Data) > 0 {
		return nil // the old names are not read beside Data: a new writer may reuse them
	}
	var old legacyHandle
	if json.Unmarshal(b, &old) != nil {
		return nil // not an old handle's fields (vmherd wrote them with these types): a newer writer's
	}
	d, err := json.Marshal(old)
	if err != nil {
		return err
	}
	if string(d) != "{}" { // an old handle with backend fields
		h.Data = d
	}
	return nil
}

// Clone returns a deep enough copy to hand to another goroutine.
func (h VmHandle) Clone() VmHandle {
	if h.Spec != nil {
		s := *h.Spec
		s.Labels = maps.Clone(s.Labels)
		h.Spec = &s
	}
	if h.Data != nil {
		h.Data = append(json.RawMessage(nil), h.Data...)
	}
	return h
}

// Package api is a small hand-written client for the subset of the
// propolis-server HTTP API (version 5.0.0) that vmherd uses: create an
// instance (ensure), read it, change its state, watch its state, and reach
// its serial console. The types mirror the wire forms of the published
// OpenAPI document; only the fields vmherd sends or reads are modelled.
package api

import (
	"encoding/json"
	"fmt"
	"strconv"
)

// Version is the API version this client speaks. Every request carries it
// in the VersionHeader; a server that does not know it answers 400.
const Version = "5.0.0"

// VersionHeader is the header propolis-server reads the client's API
// version from.
const VersionHeader = "api-version"

// MaxRequestBody is the largest request body propolis-server accepts
// (1 MiB). The instance spec, with the cloud-init seed inside it, must fit.
const MaxRequestBody = 1 << 20

// InstanceState is the state propolis-server reports for its instance.
type InstanceState string

const (
	StateCreating  InstanceState = "Creating"
	StateStarting  InstanceState = "Starting"
	StateRunning   InstanceState = "Running"
	StateStopping  InstanceState = "Stopping"
	StateStopped   InstanceState = "Stopped"
	StateRebooting InstanceState = "Rebooting"
	StateMigrating InstanceState = "Migrating"
	StateRepairing InstanceState = "Repairing"
	StateFailed    InstanceState = "Failed"
	StateDestroyed InstanceState = "Destroyed"
)

// Terminal reports whether an instance in state s will never run again
// (a new ensure is needed).
func (s InstanceState) Terminal() bool { return s == StateDestroyed || s == StateFailed }

// StateRequest is the body of PUT /instance/state: a bare JSON string.
type StateRequest string

const (
	RequestRun    StateRequest = "Run"
	RequestStop   StateRequest = "Stop"
	RequestReboot StateRequest = "Reboot"
)

// Error is the body of every 4xx/5xx answer.
type Error struct {
	ErrorCode string `json:"error_code,omitempty"`
	Message   string `json:"message"`
	RequestID string `json:"request_id"`
}

// Error codes propolis-server puts in Error.ErrorCode.
const (
	CodeNoInstance         = "NoInstance"
	CodeAlreadyInitialized = "AlreadyInitialized"
	CodeAlreadyRunning     = "AlreadyRunning"
	CodeCreateFailed       = "CreateFailed"
)

// InstanceMetadata describes where an instance runs (Oxide's control plane
// uses it for metrics; every field is required).
type InstanceMetadata struct {
	ProjectID    string `json:"project_id"`
	SiloID       string `json:"silo_id"`
	SledID       string `json:"sled_id"`
	SledModel    string `json:"sled_model"`
	SledRevision uint32 `json:"sled_revision"`
	SledSerial   string `json:"sled_serial"`
}

// InstanceProperties identify an instance.
type InstanceProperties struct {
	ID          string           `json:"id"`
	Name        string           `json:"name"`
	Description string           `json:"description"`
	Metadata    InstanceMetadata `json:"metadata"`
}

// EnsureRequest is the body of PUT /instance.
type EnsureRequest struct {
	Properties InstanceProperties `json:"properties"`
	Init       Init               `json:"init"`
}

// Init says how the instance is initialized: "Spec" (from an instance spec)
// or "MigrationTarget". Value holds the method's body.
type Init struct {
	Method string          `json:"method"`
	Value  json.RawMessage `json:"value"`
}

// InitMethodSpec initializes an instance from an InstanceSpec.
const InitMethodSpec = "Spec"

// SpecInit is the value of an Init with method "Spec".
type SpecInit struct {
	Spec InstanceSpec `json:"spec"`
}

// NewSpecInit returns the Init that creates an instance from spec.
func NewSpecInit(spec InstanceSpec) Init {
	b, err := json.Marshal(SpecInit{Spec: spec})
	if err != nil {
		panic(fmt.Sprintf("propolis api: encoding an instance spec: %v", err)) // plain structs always encode
	}
	return Init{Method: InitMethodSpec, Value: b}
}

// InstanceSpec is the virtual hardware of an instance.
type InstanceSpec struct {
	Board      Board                `json:"board"`
	Components map[string]Component `json:"components"`
}

// Board is the VM's mainboard. Cpus is a uint8 on the wire (at most 255).
type Board struct {
	Cpus     int     `json:"cpus"`
	MemoryMB uint64  `json:"memory_mb"`
	Chipset  Chipset `json:"chipset"`
}

// MaxCpus is the most vCPUs a board can have (a uint8 on the wire).
const MaxCpus = 255

// Chipset is tagged by type; only "i440_fx" exists.
type Chipset struct {
	Type  string `json:"type"`
	Value I440Fx `json:"value"`
}

// I440Fx is the Intel 440FX-compatible chipset.
type I440Fx struct {
	EnablePCIe bool `json:"enable_pcie"`
}

// ChipsetI440Fx is the only chipset type.
const ChipsetI440Fx = "i440_fx"

// Component is one entry of InstanceSpec.Components: a device or backend,
// tagged by Type, with its body in Component.
type Component struct {
	Type      string          `json:"type"`
	Component json.RawMessage `json:"component"`
}

// Component types used by vmherd.
const (
	TypeSerialPort           = "serial_port"
	TypeVirtioDisk           = "virtio_disk"
	TypeVirtioNic            = "virtio_nic"
	TypeFileStorageBackend   = "file_storage_backend"
	TypeBlobStorageBackend   = "blob_storage_backend"
	TypeVirtioNetworkBackend = "virtio_network_backend"
	TypeBootSettings         = "boot_settings"
)

// NewComponent wraps a component body with its type tag.
func NewComponent(typ string, body any) Component {
	b, err := json.Marshal(body)
	if err != nil {
		panic(fmt.Sprintf("propolis api: encoding a %s component: %v", typ, err))
	}
	return Component{Type: typ, Component: b}
}

// SerialPort is a UART; Num is com1..com4.
type SerialPort struct {
	Num string `json:"num"`
}

// PCIPath is a PCI bus/device/function.
type PCIPath struct {
	Bus      uint8 `json:"bus"`
	Device   uint8 `json:"device"`
	Function uint8 `json:"function"`
}

func (p PCIPath) String() string { return fmt.Sprintf("%d.%d.%d", p.Bus, p.Device, p.Function) }

// VirtioDisk is a virtio-block device backed by the component BackendID.
type VirtioDisk struct {
	BackendID string  `json:"backend_id"`
	PCIPath   PCIPath `json:"pci_path"`
}

// VirtioNic is a virtio-net device backed by the component BackendID.
type VirtioNic struct {
	BackendID   string  `json:"backend_id"`
	InterfaceID string  `json:"interface_id"`
	PCIPath     PCIPath `json:"pci_path"`
}

// FileStorageBackend backs a disk with a file or device on the host.
type FileStorageBackend struct {
	Path      string `json:"path"`
	Readonly  bool   `json:"readonly"`
	BlockSize uint32 `json:"block_size"`
}

// BlobStorageBackend backs a disk with bytes given in the spec.
type BlobStorageBackend struct {
	Base64   string `json:"base64"`
	Readonly bool   `json:"readonly"`
}

// VirtioNetworkBackend attaches a virtio NIC to an illumos (viona) VNIC.
type VirtioNetworkBackend struct {
	VnicName string `json:"vnic_name"`
}

// BootSettings order the devices the firmware tries to boot from.
type BootSettings struct {
	Order []BootOrderEntry `json:"order"`
}

// BootOrderEntry names a disk component.
type BootOrderEntry struct {
	ID string `json:"id"`
}

// EnsureResponse is the body of a 201 answer to PUT /instance.
type EnsureResponse struct {
	Migrate json.RawMessage `json:"migrate,omitempty"`
}

// GetResponse is the body of GET /instance.
type GetResponse struct {
	Instance Instance `json:"instance"`
}

// Instance is what GET /instance reports.
type Instance struct {
	Properties InstanceProperties `json:"properties"`
	State      InstanceState      `json:"state"`
}

// StateMonitorRequest is the body of GET /instance/state-monitor: answer
// once the state generation is at least Gen.
type StateMonitorRequest struct {
	Gen uint64 `json:"gen"`
}

// StateMonitorResponse is the instance's state and its generation.
type StateMonitorResponse struct {
	Gen       uint64          `json:"gen"`
	State     InstanceState   `json:"state"`
	Migration MigrationStatus `json:"migration"`
}

// MigrationStatus is required in a state-monitor answer; vmherd never
// migrates, so both fields are null.
type MigrationStatus struct {
	MigrationIn  json.RawMessage `json:"migration_in"`
	MigrationOut json.RawMessage `json:"migration_out"`
}

// SerialHistory is the body of GET /instance/serial/history.
type SerialHistory struct {
	Data           Bytes  `json:"data"`
	LastByteOffset uint64 `json:"last_byte_offset"`
}

// Bytes is a byte string that is a JSON array of numbers on the wire (the
// serial console may carry bytes that are not UTF-8).
type Bytes []byte

// MarshalJSON writes the bytes as an array of numbers.
func (b Bytes) MarshalJSON() ([]byte, error) {
	out := make([]byte, 0, 2+4*len(b))
	out = append(out, '[')
	for i, c := range b {
		if i > 0 {
			out = append(out, ',')
		}
		out = strconv.AppendUint(out, uint64(c), 10)
	}
	return append(out, ']'), nil
}

// UnmarshalJSON reads an array of numbers 0..255.
func (b *Bytes) UnmarshalJSON(data []byte) error {
	var nums []int // not []uint8: encoding/json reads that as base64
	if err := json.Unmarshal(data, &nums); err != nil {
		return fmt.Errorf("serial data: %w", err)
	}
	out := make([]byte, len(nums))
	for i, n := range nums {
		if n < 0 || n > 255 {
			return fmt.Errorf("serial data: %d at index %d is not a byte", n, i)
		}
		out[i] = byte(n)
	}
	*b = out
	return nil
}

// HistoryQuery selects serial console bytes: FromStart counts from the
// instance's start, MostRecent counts back from the newest byte. Exactly one
// must be set for the history endpoint; the WebSocket takes at most one.
type HistoryQuery struct {
	FromStart  *uint64
	MostRecent *uint64
	MaxBytes   *uint64
}

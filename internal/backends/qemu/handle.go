package qemu

import (
	"encoding/json"
	"fmt"
	"strconv"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

var (
	_ backends.Describer    = (*Backend)(nil)
	_ backends.SSHForwarder = (*Backend)(nil)
)

// HandleData is what this backend keeps in a handle's Data: only it reads
// it. The JSON names are those these fields had at the top of the handle
// before Data existed, so an old stored handle (which api.VmHandle's
// decoding turns into Data with the same keys) reads back the same.
type HandleData struct {
	// Accel is the accelerator QEMU runs with (kvm or tcg).
	Accel      string `json:"accel,omitempty"`
	QMPSocket  string `json:"qmp_socket,omitempty"`
	SerialSock string `json:"serial_socket,omitempty"`
	SerialLog  string `json:"serial_log,omitempty"`
	// VNC is where the display is served: unix:<work_dir>/vnc.sock.
	VNC string `json:"vnc,omitempty"`
	MAC string `json:"mac,omitempty"`
	// SSHPort is, with user networking, the 127.0.0.1 port forwarded to
	// the guest's port 22.
	SSHPort   int    `json:"ssh_port,omitempty"`
	TapDevice string `json:"tap_device,omitempty"`
	// Extra keeps data with no field of its own (the Extra* keys).
	Extra map[string]string `json:"extra,omitempty"`
}

// DataOf decodes the QEMU data of h (zero for a handle without any).
func DataOf(h api.VmHandle) (HandleData, error) {
	var d HandleData
	if len(h.Data) == 0 {
		return d, nil
	}
	if err := json.Unmarshal(h.Data, &d); err != nil {
		return d, fmt.Errorf("%w: the qemu data of handle %s of vm %s: %v", api.ErrInvalid, h.ID, h.Name, err)
	}
	return d, nil
}

// handle is the backend's whole view of an incarnation: the handle and its
// data decoded. In vm.json it is written as the api.VmHandle, data in Data.
type handle struct {
	api.VmHandle
	HandleData
}

// full decodes h's data into a handle.
func full(h api.VmHandle) (handle, error) {
	d, err := DataOf(h)
	if err != nil {
		return handle{}, err
	}
	h.Data = nil
	return handle{VmHandle: h, HandleData: d}, nil
}

// Clone returns the api.VmHandle, the data encoded into Data (a copy).
func (h handle) Clone() api.VmHandle {
	out := h.VmHandle.Clone()
	out.Data = nil
	b, err := json.Marshal(h.HandleData)
	if err == nil && string(b) != "{}" {
		out.Data = b
	}
	return out
}

func (h handle) MarshalJSON() ([]byte, error) {
	return json.Marshal(h.Clone())
}

func (h *handle) UnmarshalJSON(b []byte) error {
	var a api.VmHandle
	if err := json.Unmarshal(b, &a); err != nil {
		return err
	}
	f, err := full(a)
	if err != nil {
		return err
	}
	*h = f
	return nil
}

// Details shows the accelerator, the display socket and the forwarded SSH
// port, while they are set, from this host's own record of h's VM (as every
// call does), not from h: a handle may come from the VM's record, which
// another host wrote before a migration.
func (b *Backend) Details(h api.VmHandle) map[string]string {
	r, err := b.load(h)
	if err != nil {
		return nil
	}
	d := r.Handle.HandleData
	out := map[string]string{}
	if d.Accel != "" {
		out["accel"] = d.Accel
	}
	if d.VNC != "" {
		out["vnc"] = d.VNC
	}
	if d.SSHPort != 0 {
		out["ssh"] = "127.0.0.1:" + strconv.Itoa(d.SSHPort)
		if r.Handle.Host != "" {
			out["ssh"] += " (on host " + r.Handle.Host + ")"
		}
	}
	if d.TapDevice != "" {
		out["tap"] = d.TapDevice
	}
	if d.MAC != "" {
		out["mac"] = d.MAC
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// ForwardedSSH is the user networking port forward of h's VM, from this
// host's own record of it (0 when there is none).
func (b *Backend) ForwardedSSH(h api.VmHandle) int {
	r, err := b.load(h)
	if err != nil {
		return 0
	}
	return r.Handle.SSHPort
}

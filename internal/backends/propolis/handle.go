package propolis

import (
	"encoding/json"
	"fmt"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

var _ backends.Describer = (*Backend)(nil)

// HandleData is what this backend keeps in a handle's Data: only it reads
// it. The JSON names are those these fields had at the top of the handle
// before Data existed, so an old stored handle (which api.VmHandle's
// decoding turns into Data with the same keys) reads back the same.
type HandleData struct {
	// Endpoint is the propolis-server address (ip:port).
	Endpoint string `json:"endpoint,omitempty"`
	// InstanceID is the Propolis instance UUID.
	InstanceID string `json:"instance_id,omitempty"`
	// MAC is the guest NIC's (from the VNIC).
	MAC string `json:"mac,omitempty"`
	// Extra keeps the placement's disk, VNIC and provisioner keys.
	Extra map[string]string `json:"extra,omitempty"`
}

// DataOf decodes the Propolis data of h (zero for a handle without any).
func DataOf(h api.VmHandle) (HandleData, error) {
	var d HandleData
	if len(h.Data) == 0 {
		return d, nil
	}
	if err := json.Unmarshal(h.Data, &d); err != nil {
		return d, fmt.Errorf("%w: the propolis data of handle %s of vm %s: %v", api.ErrInvalid, h.ID, h.Name, err)
	}
	return d, nil
}

// dataOf is DataOf where data that does not decode reads as none (a handle
// without a server or instance, which the calls refuse as such).
func dataOf(h api.VmHandle) HandleData {
	d, _ := DataOf(h)
	return d
}

// withData returns h with d as its data.
func withData(h api.VmHandle, d HandleData) api.VmHandle {
	h.Data = nil
	if b, err := json.Marshal(d); err == nil && string(b) != "{}" {
		h.Data = b
	}
	return h
}

// Details shows the server and the instance.
func (b *Backend) Details(h api.VmHandle) map[string]string {
	d := dataOf(h)
	out := map[string]string{}
	if d.Endpoint != "" {
		out["endpoint"] = d.Endpoint
	}
	if d.InstanceID != "" {
		out["instance_id"] = d.InstanceID
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

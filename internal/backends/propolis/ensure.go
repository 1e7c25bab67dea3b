package propolis

import (
	"encoding/base64"
	"encoding/json"
	"fmt"

	"github.com/vmherd/vmherd/api"

	"github.com/google/uuid"

	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
)

// Component names in the instance spec. They are names, not UUIDs (a
// SpecKey may be either), so they never look like a UUID.
const (
	compSerial      = "com1"
	compBootDisk    = "boot-disk"
	compBootBackend = "boot-disk-backend"
	compNIC         = "net0"
	compNICBackend  = "net0-backend"
	compSeed        = "cloud-init"
	compSeedBackend = "cloud-init-backend"
	compBootOrder   = "boot-settings"
)

// PCI slots on bus 0. Devices 0 and 1 belong to the i440FX host bridge and
// its ISA bridge; the rest are free.
var (
	pciBootDisk = papi.PCIPath{Bus: 0, Device: 4, Function: 0}
	pciNIC      = papi.PCIPath{Bus: 0, Device: 8, Function: 0}
	pciSeed     = papi.PCIPath{Bus: 0, Device: 24, Function: 0}
)

// diskBlockSize is the logical block size of the boot disk (zvols present
// 512-byte sectors).
const diskBlockSize = 512

// uuidSpace derives the stable UUIDs vmherd puts in instance metadata.
var uuidSpace = uuid.MustParse("6f1c9a52-3c7e-4d8b-9a61-0b5e2f7d4c10")

// ensureInput is what an instance spec is built from.
type ensureInput struct {
	ID       string // instance UUID (the handle's InstanceID)
	Spec     api.VmSpec
	Host     string // this host, for the metadata's sled fields
	DiskPath string // the boot disk (a zvol device, or the image itself)
	VNIC     string // the NIC's VNIC; "" for no NIC
}

// buildEnsure returns the PUT /instance request for a VM and its encoded
// body. It fails, before anything is sent, on a spec the server would
// refuse: more than 255 vCPUs, or a body (the seed ISO travels in it,
// base64) over the server's 1 MiB limit.
func buildEnsure(in ensureInput) (papi.EnsureRequest, []byte, error) {
	s := in.Spec
	if s.Vcpus < 1 || s.Vcpus > papi.MaxCpus {
		return papi.EnsureRequest{}, nil, fmt.Errorf("%w: spec.vcpus: %d is out of range for propolis (1..%d)", api.ErrInvalid, s.Vcpus, papi.MaxCpus)
	}
	if s.MemoryMB < 1 {
		return papi.EnsureRequest{}, nil, fmt.Errorf("%w: spec.memory_mb: %d must be positive", api.ErrInvalid, s.MemoryMB)
	}
	if in.DiskPath == "" {
		return papi.EnsureRequest{}, nil, fmt.Errorf("%w: spec.image_path: the propolis backend needs a boot disk image", api.ErrInvalid)
	}
	id, err := uuid.Parse(in.ID)
	if err != nil {
		return papi.EnsureRequest{}, nil, fmt.Errorf("instance id %q: %w", in.ID, err)
	}
	iso, err := seedISO(s)
	if err != nil {
		return papi.EnsureRequest{}, nil, err
	}
	comps := map[string]papi.Component{
		compSerial: papi.NewComponent(papi.TypeSerialPort, papi.SerialPort{Num: "com1"}),
		compBootDisk: papi.NewComponent(papi.TypeVirtioDisk, papi.VirtioDisk{
			BackendID: compBootBackend, PCIPath: pciBootDisk,
		}),
		compBootBackend: papi.NewComponent(papi.TypeFileStorageBackend, papi.FileStorageBackend{
			Path: in.DiskPath, Readonly: false, BlockSize: diskBlockSize,
		}),
		compSeed: papi.NewComponent(papi.TypeVirtioDisk, papi.VirtioDisk{
			BackendID: compSeedBackend, PCIPath: pciSeed,
		}),
		compSeedBackend: papi.NewComponent(papi.TypeBlobStorageBackend, papi.BlobStorageBackend{
			Base64: base64.StdEncoding.EncodeToString(iso), Readonly: true,
		}),
		compBootOrder: papi.NewComponent(papi.TypeBootSettings, papi.BootSettings{
			Order: []papi.BootOrderEntry{{ID: compBootDisk}},
		}),
	}
	if in.VNIC != "" {
		comps[compNIC] = papi.NewComponent(papi.TypeVirtioNic, papi.VirtioNic{
			BackendID: compNICBackend, InterfaceID: uuid.NewSHA1(id, []byte(compNIC)).String(), PCIPath: pciNIC,
		})
		comps[compNICBackend] = papi.NewComponent(papi.TypeVirtioNetworkBackend, papi.VirtioNetworkBackend{VnicName: in.VNIC})
	}
	req := papi.EnsureRequest{
		Properties: papi.InstanceProperties{
			ID:          id.String(),
			Name:        s.Name,
			Description: "vmherd vm " + s.Name,
			Metadata: papi.InstanceMetadata{
				ProjectID:    uuid.NewSHA1(uuidSpace, []byte("project")).String(),
				SiloID:       uuid.NewSHA1(uuidSpace, []byte("silo")).String(),
				SledID:       uuid.NewSHA1(uuidSpace, []byte("sled/"+in.Host)).String(),
				SledModel:    "vmherd",
				SledRevision: 0,
				SledSerial:   in.Host,
			},
		},
		Init: papi.NewSpecInit(papi.InstanceSpec{
			Board: papi.Board{
				Cpus:     s.Vcpus,
				MemoryMB: uint64(s.MemoryMB),
				Chipset:  papi.Chipset{Type: papi.ChipsetI440Fx, Value: papi.I440Fx{EnablePCIe: false}},
			},
			Components: comps,
		}),
	}
	body, err := json.Marshal(req)
	if err != nil {
		return papi.EnsureRequest{}, nil, fmt.Errorf("encoding the instance spec of vm %s: %w", s.Name, err)
	}
	if len(body) > papi.MaxRequestBody {
		ud := 0
		if s.CloudInit != nil {
			ud = len(s.CloudInit.UserData) + len(s.CloudInit.NetworkConfig)
		}
		return papi.EnsureRequest{}, nil, fmt.Errorf("%w: spec.cloud_init: the instance spec of vm %s would be %d bytes, over propolis-server's %d-byte request limit "+
			"(the cloud-init seed, with %d bytes of user-data and network-config, travels in it as base64); shrink user_data, or fetch the bulk from the network in it",
			api.ErrInvalid, s.Name, len(body), papi.MaxRequestBody, ud)
	}
	return req, body, nil
}

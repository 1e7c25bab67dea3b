package propolis

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"

	"github.com/vmherd/vmherd/api"

	"github.com/google/uuid"
	"github.com/kdomanski/iso9660"

	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
	"github.com/vmherd/vmherd/internal/backends/propolis/fake"
)

func testInput() ensureInput {
	return ensureInput{
		ID: "0b7d5c1e-8f7a-4f0e-9c43-5a1f2b3c4d5e", Host: "h1",
		DiskPath: "/dev/zvol/rdsk/rpool/vmherd/web1", VNIC: "vnic0",
		Spec: api.VmSpec{
			Name: "web1", Vcpus: 4, MemoryMB: 2048, ImagePath: "/images/base.raw",
			CloudInit: &api.CloudInitConfig{UserData: "#cloud-config\npackages: [htop]\n", Hostname: "web-one"},
		},
	}
}

func component[T any](t *testing.T, spec papi.InstanceSpec, name, typ string) T {
	t.Helper()
	c, ok := spec.Components[name]
	if !ok {
		t.Fatalf("no component %s", name)
	}
	if c.Type != typ {
		t.Fatalf("component %s is a %s, want %s", name, c.Type, typ)
	}
	var v T
	if err := json.Unmarshal(c.Component, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestEnsureBody(t *testing.T) {
	req, body, err := buildEnsure(testInput())
	if err != nil {
		t.Fatal(err)
	}
	p := req.Properties
	if p.ID != testInput().ID || p.Name != "web1" || p.Metadata.SledSerial != "h1" {
		t.Fatalf("properties %+v", p)
	}
	for _, id := range []string{p.Metadata.ProjectID, p.Metadata.SiloID, p.Metadata.SledID} {
		if _, err := uuid.Parse(id); err != nil {
			t.Fatalf("metadata id %q: %v", id, err)
		}
	}
	if req.Init.Method != "Spec" {
		t.Fatalf("init method %q", req.Init.Method)
	}
	var si papi.SpecInit
	if err := json.Unmarshal(req.Init.Value, &si); err != nil {
		t.Fatal(err)
	}
	s := si.Spec
	if s.Board.Cpus != 4 || s.Board.MemoryMB != 2048 || s.Board.Chipset.Type != "i440_fx" {
		t.Fatalf("board %+v", s.Board)
	}
	var names []string
	for n := range s.Components {
		names = append(names, n)
	}
	sort.Strings(names)
	if got := strings.Join(names, " "); got != "boot-disk boot-disk-backend boot-settings cloud-init cloud-init-backend com1 net0 net0-backend" {
		t.Fatalf("components %s", got)
	}
	if sp := component[papi.SerialPort](t, s, "com1", "serial_port"); sp.Num != "com1" {
		t.Fatalf("serial %+v", sp)
	}
	disk := component[papi.VirtioDisk](t, s, "boot-disk", "virtio_disk")
	file := component[papi.FileStorageBackend](t, s, disk.BackendID, "file_storage_backend")
	if file.Path != "/dev/zvol/rdsk/rpool/vmherd/web1" || file.Readonly || file.BlockSize != 512 {
		t.Fatalf("boot disk backend %+v", file)
	}
	nic := component[papi.VirtioNic](t, s, "net0", "virtio_nic")
	if nb := component[papi.VirtioNetworkBackend](t, s, nic.BackendID, "virtio_network_backend"); nb.VnicName != "vnic0" {
		t.Fatalf("nic backend %+v", nb)
	}
	if _, err := uuid.Parse(nic.InterfaceID); err != nil {
		t.Fatalf("interface id %q", nic.InterfaceID)
	}
	seed := component[papi.VirtioDisk](t, s, "cloud-init", "virtio_disk")
	blob := component[papi.BlobStorageBackend](t, s, seed.BackendID, "blob_storage_backend")
	if !blob.Readonly {
		t.Fatal("seed disk is writable")
	}
	boot := component[papi.BootSettings](t, s, "boot-settings", "boot_settings")
	if len(boot.Order) != 1 || boot.Order[0].ID != "boot-disk" {
		t.Fatalf("boot order %+v", boot)
	}
	// PCI paths: unique, and clear of the chipset's devices 0 and 1.
	seen := map[papi.PCIPath]bool{}
	for _, p := range []papi.PCIPath{disk.PCIPath, nic.PCIPath, seed.PCIPath} {
		if seen[p] || p.Device < 2 {
			t.Fatalf("PCI path %s reused or reserved", p)
		}
		seen[p] = true
	}
	if err := fake.CheckSpec(s); err != nil {
		t.Fatal(err)
	}
	// The seed is a NoCloud ISO.
	iso, err := base64.StdEncoding.DecodeString(blob.Base64)
	if err != nil {
		t.Fatal(err)
	}
	files := readISO(t, iso)
	if files["user-data"] != "#cloud-config\npackages: [htop]\n" || files["meta-data"] != "instance-id: web1\nlocal-hostname: web-one\n" {
		t.Fatalf("seed files %q", files)
	}
	// The body matches the server's OpenAPI document.
	spec, err := fake.LoadSpec()
	if err != nil {
		t.Fatal(err)
	}
	if spec == nil {
		t.Skip("OpenAPI document not found")
	}
	r := httptest.NewRequest("PUT", "/instance", bytes.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	if _, err := spec.ValidateRequest(context.Background(), r, body); err != nil {
		t.Fatalf("ensure body does not match the OpenAPI document: %v", err)
	}
}

func readISO(t *testing.T, b []byte) map[string]string {
	t.Helper()
	img, err := iso9660.OpenImage(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if label, err := img.Label(); err != nil || label != "cidata" {
		t.Fatalf("label %q %v", label, err)
	}
	root, err := img.RootDir()
	if err != nil {
		t.Fatal(err)
	}
	kids, err := root.GetChildren()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, k := range kids {
		data, _ := io.ReadAll(k.Reader())
		out[strings.TrimSuffix(k.Name(), ";1")] = string(data)
	}
	return out
}

func TestEnsureWithoutNIC(t *testing.T) {
	in := testInput()
	in.VNIC = ""
	in.Spec.CloudInit = nil
	in.Spec.SSH = &api.SshConfig{User: "ops", PublicKey: "ssh-ed25519 AAAA ops@x"}
	req, _, err := buildEnsure(in)
	if err != nil {
		t.Fatal(err)
	}
	var si papi.SpecInit
	_ = json.Unmarshal(req.Init.Value, &si)
	if _, ok := si.Spec.Components["net0"]; ok {
		t.Fatal("a NIC without a VNIC")
	}
	blob := component[papi.BlobStorageBackend](t, si.Spec, "cloud-init-backend", "blob_storage_backend")
	iso, _ := base64.StdEncoding.DecodeString(blob.Base64)
	if ud := readISO(t, iso)["user-data"]; !strings.Contains(ud, `- name: ops`) || !strings.Contains(ud, "ssh-ed25519 AAAA ops@x") {
		t.Fatalf("user-data %q", ud)
	}
}

func TestEnsureLimits(t *testing.T) {
	for _, mut := range []func(*ensureInput){
		func(in *ensureInput) { in.Spec.Vcpus = 256 },
		func(in *ensureInput) { in.Spec.Vcpus = 0 },
		func(in *ensureInput) { in.DiskPath = "" },
		func(in *ensureInput) { in.Spec.CloudInit.UserData = strings.Repeat("#", 800<<10) },
	} {
		in := testInput()
		mut(&in)
		if _, _, err := buildEnsure(in); err == nil {
			t.Errorf("%+v accepted", in.Spec)
		}
	}
	// Just under the limit still fits.
	in := testInput()
	in.Spec.CloudInit.UserData = strings.Repeat("#", 600<<10)
	if _, body, err := buildEnsure(in); err != nil || len(body) > papi.MaxRequestBody {
		t.Fatalf("600 KiB of user-data: %d bytes, %v", len(body), err)
	}
}

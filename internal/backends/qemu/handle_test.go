package qemu

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/vmherd/vmherd/api"
)

func legacyHandle(t *testing.T) api.VmHandle {
	t.Helper()
	b, err := os.ReadFile("../../../api/testdata/handle-qemu-legacy.json")
	if err != nil {
		t.Fatal(err)
	}
	var h api.VmHandle
	if err := json.Unmarshal(b, &h); err != nil {
		t.Fatal(err)
	}
	return h
}

// A handle stored before Data (events, records, tasks written then) reads
// back with every QEMU field, through DataOf and through the details and
// forwarded port the worker asks for.
func TestLegacyHandleData(t *testing.T) {
	h := legacyHandle(t)
	d, err := DataOf(h)
	if err != nil {
		t.Fatal(err)
	}
	want := HandleData{Accel: "tcg", QMPSocket: "/var/lib/vmherd/vms/web1/qmp.sock", SerialSock: "/var/lib/vmherd/vms/web1/serial.sock",
		SerialLog: "/var/lib/vmherd/vms/web1/console.log", VNC: "unix:/var/lib/vmherd/vms/web1/vnc.sock", MAC: "02:aa:bb:cc:dd:ee",
		SSHPort: 40022, Extra: map[string]string{"accel_reason": "no kvm", ExtraBaseFmt: "qcow2", ExtraStopPath: "acpi"}}
	if !reflect.DeepEqual(d, want) {
		t.Fatalf("data %+v\nwant %+v", d, want)
	}
	// The details and the port come from this host's vm.json, not from
	// the handle asked about (which may be the record's, another host's).
	b := Backend{vmsDir: t.TempDir()}
	raw, err := os.ReadFile("../../../api/testdata/handle-qemu-legacy.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(b.vmsDir, h.Name), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(b.vmsDir, h.Name, recordFile), []byte(`{"version":1,"handle":`+string(raw)+`}`), 0o600); err != nil {
		t.Fatal(err)
	}
	forged := h.Clone()
	forged.Data = json.RawMessage(`{"ssh_port":22,"accel":"kvm"}`)
	if p := b.ForwardedSSH(forged); p != 40022 {
		t.Fatalf("ForwardedSSH of a handle claiming port 22 = %d, want vm.json's 40022", p)
	}
	if p := b.ForwardedSSH(h); p != 40022 {
		t.Fatalf("ForwardedSSH = %d", p)
	}
	wantDetails := map[string]string{"accel": "tcg", "vnc": want.VNC, "ssh": "127.0.0.1:40022 (on host h1)", "mac": want.MAC}
	if got := b.Details(h); !reflect.DeepEqual(got, wantDetails) {
		t.Fatalf("Details = %v, want %v", got, wantDetails)
	}
	if got := b.Details(forged); !reflect.DeepEqual(got, wantDetails) {
		t.Fatalf("Details of a handle with other data = %v, want vm.json's %v", got, wantDetails)
	}
	if b.Details(api.VmHandle{Name: "x"}) != nil || b.ForwardedSSH(api.VmHandle{Name: "x"}) != 0 {
		t.Fatal("a VM without a record here has details or a port")
	}
	if _, err := DataOf(api.VmHandle{Name: "x", Data: json.RawMessage(`{"ssh_port":"x"}`)}); err == nil {
		t.Fatal("DataOf took data of the wrong shape")
	}
}

// A vm.json written before Data (its handle flat) still loads; saved again
// it has the handle in the new form, which loads the same.
func TestLegacyRecord(t *testing.T) {
	h := legacyHandle(t)
	wd := t.TempDir()
	raw, err := os.ReadFile("../../../api/testdata/handle-qemu-legacy.json")
	if err != nil {
		t.Fatal(err)
	}
	old := `{"version":1,"handle":` + string(raw) + `}`
	if err := os.WriteFile(filepath.Join(wd, recordFile), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := readRecord(wd)
	if err != nil {
		t.Fatal(err)
	}
	if r.Handle.QMPSocket != "/var/lib/vmherd/vms/web1/qmp.sock" || r.Handle.SSHPort != 40022 || r.Handle.PID != 4242 || r.Handle.Extra[ExtraBaseFmt] != "qcow2" {
		t.Fatalf("record handle %+v", r.Handle)
	}
	if got := r.Handle.Clone(); !reflect.DeepEqual(mustData(t, got), mustData(t, h)) || got.ID != h.ID || got.Data == nil {
		t.Fatalf("Clone %+v, want the data of %+v", got, h)
	}
	r.Handle.WorkDir = wd
	if err := r.save(); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(wd, recordFile))
	var top struct {
		Handle map[string]json.RawMessage `json:"handle"`
	}
	if err := json.Unmarshal(b, &top); err != nil {
		t.Fatal(err)
	}
	if _, ok := top.Handle["qmp_socket"]; ok || top.Handle["data"] == nil {
		t.Fatalf("saved record not in the new form: %s", b)
	}
	r2, err := readRecord(wd)
	if err != nil || !reflect.DeepEqual(r2.Handle, r.Handle) {
		t.Fatalf("reloaded %+v (%v), want %+v", r2.Handle, err, r.Handle)
	}
}

func mustData(t *testing.T, h api.VmHandle) HandleData {
	t.Helper()
	d, err := DataOf(h)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// dataOf is DataOf for tests that only read a field: data
// that does not decode reads as none.
func dataOf(h api.VmHandle) HandleData {
	d, _ := DataOf(h)
	return d
}

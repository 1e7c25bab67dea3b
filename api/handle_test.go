package api

import (
	"encoding/json"
	"os"
	"reflect"
	"testing"
)

// Handles stored before Data (testdata/*-legacy.json, encoded by the
// VmHandle of that time) decode with their backend fields as Data, an
// object with the same keys, and everything else as before.
func TestLegacyHandleDecodesIntoData(t *testing.T) {
	for file, want := range map[string]map[string]any{
		"testdata/handle-qemu-legacy.json": {
			"accel": "tcg", "qmp_socket": "/var/lib/vmherd/vms/web1/qmp.sock", "serial_socket": "/var/lib/vmherd/vms/web1/serial.sock",
			"serial_log": "/var/lib/vmherd/vms/web1/console.log", "vnc": "unix:/var/lib/vmherd/vms/web1/vnc.sock",
			"mac": "02:aa:bb:cc:dd:ee", "ssh_port": float64(40022),
			"extra": map[string]any{"accel_reason": "no kvm", "base_format": "qcow2", "stop_path": "acpi"},
		},
		"testdata/handle-propolis-legacy.json": {
			"mac": "02:08:20:01:02:03", "endpoint": "127.0.0.1:12400", "instance_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
			"extra": map[string]any{"disk_path": "/dev/zvol/rdsk/rpool/vmherd/p1", "vnic": "vmherd_p1", "prov.zvol": "rpool/vmherd/p1"},
		},
	} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var h VmHandle
		if err := json.Unmarshal(b, &h); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if h.ID == "" || h.Name == "" || h.PID == 0 || h.Spec == nil || h.Spec.Network == nil {
			t.Fatalf("%s: generic fields lost: %+v", file, h)
		}
		var got map[string]any
		if err := json.Unmarshal(h.Data, &got); err != nil {
			t.Fatalf("%s: data %s: %v", file, h.Data, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: data %v\nwant %v", file, got, want)
		}
		// Written again, it is in the new form, and reads back the same.
		again, err := json.Marshal(h)
		if err != nil {
			t.Fatal(err)
		}
		var top map[string]json.RawMessage
		_ = json.Unmarshal(again, &top)
		for _, k := range []string{"accel", "qmp_socket", "ssh_port", "endpoint", "instance_id", "mac", "extra"} {
			if _, ok := top[k]; ok {
				t.Errorf("%s: re-encoded handle still has %q at the top: %s", file, k, again)
			}
		}
		var h2 VmHandle
		if err := json.Unmarshal(again, &h2); err != nil || !reflect.DeepEqual(h2, h) {
			t.Errorf("%s: round trip: %v\n%+v\n%+v", file, err, h2, h)
		}
	}
}

// A handle with Data keeps it as written and ignores old top-level fields;
// one with neither has no Data; a null Data is none.
func TestHandleData(t *testing.T) {
	var h VmHandle
	if err := json.Unmarshal([]byte(`{"id":"a","name":"v","backend":"qemu","data":{"ssh_port": 22},"ssh_port":99,"qmp_socket":"/old"}`), &h); err != nil {
		t.Fatal(err)
	}
	if string(h.Data) != `{"ssh_port": 22}` {
		t.Fatalf("data %s", h.Data)
	}
	for _, in := range []string{`{"id":"a","name":"v","backend":"noop"}`, `{"id":"a","name":"v","backend":"noop","data":null}`} {
		h = VmHandle{}
		if err := json.Unmarshal([]byte(in), &h); err != nil || h.Data != nil {
			t.Fatalf("%s: data %q, %v", in, h.Data, err)
		}
	}
	// An old name with another type, in a handle without data, is a newer
	// writer's field: ignored, as any unknown field.
	h = VmHandle{}
	if err := json.Unmarshal([]byte(`{"id":"a","ssh_port":"x"}`), &h); err != nil || h.ID != "a" || h.Data != nil {
		t.Fatalf("an old name with another type: %+v, %v", h, err)
	}
	// Beside Data the old names are not read at all: a newer writer may
	// use them with other types.
	h = VmHandle{}
	if err := json.Unmarshal([]byte(`{"id":"a","data":{"x":1},"extra":{"k":1},"endpoint":{"host":"h"},"ssh_port":"x"}`), &h); err != nil || string(h.Data) != `{"x":1}` {
		t.Fatalf("old names with new types beside data: data %s, %v", h.Data, err)
	}
	// A reused handle keeps no data of its last decode.
	if err := json.Unmarshal([]byte(`{"id":"b","qmp_socket":"/q"}`), &h); err != nil || string(h.Data) != `{"qmp_socket":"/q"}` {
		t.Fatalf("reused handle: data %s, %v", h.Data, err)
	}
	// Clone copies Data.
	h = VmHandle{Data: json.RawMessage(`{"a":1}`)}
	c := h.Clone()
	c.Data[2] = 'b'
	if string(h.Data) != `{"a":1}` {
		t.Fatalf("Clone shares Data: %s", h.Data)
	}
}

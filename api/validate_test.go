package api

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestValidateName(t *testing.T) {
	good := []string{"a", "web1", "web-1", "a_b", "0", strings.Repeat("a", 63)}
	bad := []string{"", "Web1", "web.1", "web/1", "..", "-a", "a-", "wéb", strings.Repeat("a", 64), "a b", "a*", "a>"}
	for _, n := range good {
		if err := ValidateName(n); err != nil {
			t.Errorf("ValidateName(%q) = %v, want nil", n, err)
		}
	}
	for _, n := range bad {
		err := ValidateName(n)
		if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "name") {
			t.Errorf("ValidateName(%q) = %v, want an ErrInvalid naming the field", n, err)
		}
	}
}

func TestSpecValidate(t *testing.T) {
	base := VmSpec{Name: "web1", Backend: BackendQEMU, ImagePath: "/img.qcow2"}.WithDefaults()
	cases := []struct {
		field string
		mod   func(*VmSpec)
	}{
		{"spec.vcpus", func(s *VmSpec) { s.Vcpus = -1 }},
		{"spec.vcpus", func(s *VmSpec) { s.Vcpus = 100000 }},
		{"spec.memory_mb", func(s *VmSpec) { s.MemoryMB = 63 }},
		{"spec.memory_mb", func(s *VmSpec) { s.MemoryMB = 1 << 30 }},
		{"spec.image_path", func(s *VmSpec) { s.ImagePath = "" }},
		{"spec.backend", func(s *VmSpec) { s.Backend = "xen" }},
		{"spec.network.type", func(s *VmSpec) { s.Network = &NetworkConfig{Type: "bogus"} }},
		{"spec.network.bridge", func(s *VmSpec) { s.Network = &NetworkConfig{Type: NetworkTap, Bridge: "../x"} }},
		{"spec.network.bridge", func(s *VmSpec) { s.Network = &NetworkConfig{Type: NetworkTap, Bridge: "-help"} }},
		{"spec.network.link", func(s *VmSpec) { s.Network = &NetworkConfig{Type: NetworkVnic, Link: "-x"} }},
		{"spec.cloud_init.hostname", func(s *VmSpec) { s.CloudInit = &CloudInitConfig{Hostname: "web\x00"} }},
		{"spec.cloud_init.hostname", func(s *VmSpec) { s.CloudInit = &CloudInitConfig{Hostname: "a\x1b[2J"} }},
		{"spec.cloud_init.instance_id", func(s *VmSpec) { s.CloudInit = &CloudInitConfig{InstanceID: "i\x00"} }},
		{"spec.cloud_init.user_data", func(s *VmSpec) {
			s.CloudInit = &CloudInitConfig{UserData: strings.Repeat("x", MaxUserDataSize+1)}
		}},
		{"spec.accel", func(s *VmSpec) { s.Accel = "hvf" }},
		{"name", func(s *VmSpec) { s.Name = "../etc" }},
	}
	if err := base.Validate(); err != nil {
		t.Fatalf("base spec: %v", err)
	}
	for _, c := range cases {
		s := base
		c.mod(&s)
		err := s.Validate()
		if err == nil || !strings.HasPrefix(err.Error(), c.field+":") {
			t.Errorf("%s: got %v, want error naming %s", c.field, err, c.field)
		}
	}
	noop := VmSpec{Name: "n1", Backend: BackendNoop}.WithDefaults()
	if err := noop.Validate(); err != nil {
		t.Errorf("noop spec without image: %v", err)
	}
}

// Old records decode when new fields appear, and optional fields are omitted.
func TestHandleJSONCompat(t *testing.T) {
	old := `{"id":"h1","name":"web1","backend":"qemu","pid":42,"some_future_field":{"x":1}}`
	var h VmHandle
	if err := json.Unmarshal([]byte(old), &h); err != nil {
		t.Fatal(err)
	}
	if h.ID != "h1" || h.PID != 42 || h.Backend != BackendQEMU {
		t.Fatalf("decoded %+v", h)
	}
	b, _ := json.Marshal(VmHandle{ID: "h1", Name: "web1", Backend: BackendNoop})
	if got, want := string(b), `{"id":"h1","name":"web1","backend":"noop"}`; got != want {
		t.Fatalf("marshal = %s, want %s", got, want)
	}
	b, _ = json.Marshal(VmSpec{Name: "x", Network: &NetworkConfig{Type: NetworkTap, Bridge: "br0"}})
	if got, want := string(b), `{"name":"x","network":{"type":"tap","bridge":"br0"}}`; got != want {
		t.Fatalf("marshal = %s, want %s", got, want)
	}
}

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

func TestValidateLabels(t *testing.T) {
	many := map[string]string{}
	for i := range MaxLabels + 1 {
		many[strings.Repeat("k", i+1)] = "v"
	}
	atMost := map[string]string{}
	for i := range MaxLabels {
		atMost[strings.Repeat("k", i+1)] = "v"
	}
	cases := []struct {
		name   string
		labels map[string]string
		// field and rule: the start of the error and a part of its rule
		// ("" for a valid set).
		field, rule string
	}{
		{"none", nil, "", ""},
		{"simple", map[string]string{"team": "ci", "job": "1234"}, "", ""},
		{"empty value", map[string]string{"team": ""}, "", ""},
		{"prefixed key", map[string]string{"ci.example.com/job": "a.b_c-d"}, "", ""},
		{"mixed case and dots", map[string]string{"App.Kind_2": "Web Server"}, "", ""},
		{"unicode value", map[string]string{"owner": "zoë"}, "", ""},
		{"longest", map[string]string{strings.Repeat("k", 63): strings.Repeat("v", 63)}, "", ""},
		{"longest unicode value", map[string]string{"k": strings.Repeat("é", 63)}, "", ""},
		{"at most", atMost, "", ""},
		{"too many", many, "spec.labels:", "33 labels are too many (at most 32)"},
		{"empty key", map[string]string{"": "v"}, "spec.labels:", "must not be empty"},
		{"long key", map[string]string{strings.Repeat("k", 64): "v"}, "spec.labels:", "64 characters is too long"},
		{"key starts with dash", map[string]string{"-x": "v"}, "spec.labels:", `key "-x" must match`},
		{"key ends with dot", map[string]string{"x.": "v"}, "spec.labels:", `key "x." must match`},
		{"key with space", map[string]string{"a b": "v"}, "spec.labels:", `key "a b" must match`},
		{"key with equals", map[string]string{"a=b": "v"}, "spec.labels:", `key "a=b" must match`},
		{"key with comma", map[string]string{"a,b": "v"}, "spec.labels:", `key "a,b" must match`},
		{"two slashes", map[string]string{"a/b/c": "v"}, "spec.labels:", `key "a/b/c" must match`},
		{"leading slash", map[string]string{"/b": "v"}, "spec.labels:", `key "/b" must match`},
		{"trailing slash", map[string]string{"a/": "v"}, "spec.labels:", `key "a/" must match`},
		{"dot around slash", map[string]string{"a./b": "v"}, "spec.labels:", `key "a./b" must match`},
		{"non-ASCII key", map[string]string{"wéb": "v"}, "spec.labels:", `key "wéb" must match`},
		{"control in key", map[string]string{"a\x00": "v"}, "spec.labels:", `must match`},
		{"long value", map[string]string{"team": strings.Repeat("v", 64)}, "spec.labels.team:", "64 characters is too long (at most 63)"},
		{"newline in value", map[string]string{"team": "a\nb"}, "spec.labels.team:", "must not contain control characters"},
		{"escape in value", map[string]string{"team": "\x1b[2J"}, "spec.labels.team:", "must not contain control characters"},
		{"C1 in value", map[string]string{"team": "a\u0085"}, "spec.labels.team:", "must not contain control characters"},
		{"right-to-left override in value", map[string]string{"team": "\u202egnp.exe"}, "spec.labels.team:", "direction-changing"},
		{"zero-width space in value", map[string]string{"team": "c\u200bi"}, "spec.labels.team:", "invisible"},
		{"byte order mark in value", map[string]string{"team": "\ufeffci"}, "spec.labels.team:", "invisible"},
		{"zero-width joiner in value (emoji)", map[string]string{"team": "\U0001F469\u200d\U0001F4BB"}, "", ""},
		{"zero-width non-joiner in value (Persian)", map[string]string{"owner": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"}, "", ""},
		{"tab in value", map[string]string{"team": "a\tb"}, "spec.labels.team:", "must not contain control characters"},
		{"invalid UTF-8", map[string]string{"team": "\xff"}, "spec.labels.team:", "valid UTF-8"},
		// The first broken label in key order is the one named.
		{"first in order", map[string]string{"b": "\n", "a": "\n"}, "spec.labels.a:", "control"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := ValidateLabels(c.labels)
			if c.field == "" {
				if err != nil {
					t.Fatalf("ValidateLabels = %v, want nil", err)
				}
				return
			}
			var fe *FieldError
			if err == nil || !errors.As(err, &fe) || !errors.Is(err, ErrInvalid) {
				t.Fatalf("ValidateLabels = %v, want a FieldError", err)
			}
			if !strings.HasPrefix(err.Error(), c.field) || !strings.Contains(err.Error(), c.rule) {
				t.Fatalf("ValidateLabels = %q, want %q ... %q", err, c.field, c.rule)
			}
			// Validate checks them as part of the spec.
			s := VmSpec{Name: "web1", Labels: c.labels}.WithDefaults()
			if err := s.Validate(); err == nil || !strings.HasPrefix(err.Error(), c.field) {
				t.Fatalf("Validate = %v, want the labels' error", err)
			}
		})
	}
}

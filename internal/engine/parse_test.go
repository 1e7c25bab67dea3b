package engine

import (
	"errors"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	cases := []struct {
		action, body, wantErr string
	}{
		{"start", "", ""},
		{"start", "  ", ""},
		{"start", `{"command_id":"x","timeout_s":5}`, ""},
		{"prepare", `{"spec":{"backend":"noop"}}`, ""},
		{"prepare", `{}`, "spec"},
		{"start", `{"spec":{}}`, "spec"},
		{"start", `[1]`, ""},
		{"start", `{"timeout_s":1.5}`, "timeout_s"},
		{"start", `{"command_id":"a b"}`, "command_id"},
		{"launch", `{}`, "action"},
		{"start", strings.Repeat(" ", 2<<20), "too large"},
	}
	for _, c := range cases {
		_, _, err := parse(c.action, []byte(c.body))
		switch {
		case c.wantErr == "" && c.body == `[1]`:
			if err == nil {
				t.Errorf("%s %q: accepted a JSON array", c.action, c.body)
			}
		case c.wantErr == "" && err != nil:
			t.Errorf("%s %.40q: %v", c.action, c.body, err)
		case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
			t.Errorf("%s %.40q: error %v, want one mentioning %q", c.action, c.body, err, c.wantErr)
		}
	}
}

// FuzzParse: any body for any action either decodes or yields a rejection
// with a reason; it never panics, and what decodes passes spec validation
// or is rejected for it by admit (checked here for prepare specs).
func FuzzParse(f *testing.F) {
	for _, s := range []string{"", "{}", `{"spec":{"name":"a","vcpus":2}}`, `{"timeout_s":3}`, `{"host":"h1","spec":{}}`, `{"spec":{"network":{"type":"tap","bridge":"br0"}}}`, "\x00", `{"spec":{"cloud_init":{"user_data":"x"}}}`} {
		for _, a := range []string{"prepare", "start", "stop", "destroy", "x"} {
			f.Add(a, []byte(s))
		}
	}
	f.Fuzz(func(t *testing.T, action string, body []byte) {
		cmd, _, err := parse(action, body)
		if err != nil {
			var r *rejection
			if !errors.As(err, &r) || r.reason == "" {
				t.Fatalf("error %v is not a rejection with a reason", err)
			}
			return
		}
		if cmd == nil {
			t.Fatal("nil command without an error")
		}
		if action == "prepare" && cmd.Spec == nil {
			t.Fatal("prepare decoded without a spec")
		}
		if action != "prepare" && (cmd.Spec != nil || cmd.Host != "") {
			t.Fatalf("%s decoded with a spec or host", action)
		}
		if cmd.Spec != nil {
			s := cmd.Spec.WithDefaults()
			if s.Name == "" {
				s.Name = "fuzz"
			}
			_ = s.Validate() // must not panic
		}
	})
}

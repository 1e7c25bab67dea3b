package api

import (
	"errors"
	"strings"
	"testing"

	"github.com/vmherd/vmherd/internal/fsm"
)

func TestParseAction(t *testing.T) {
	for _, a := range fsm.Actions {
		got, err := ParseAction(string(a))
		if err != nil || got != a {
			t.Errorf("ParseAction(%q) = (%q, %v)", a, got, err)
		}
	}
	for _, s := range []string{"", "Start", "reboot", " stop"} {
		_, err := ParseAction(s)
		if !errors.Is(err, ErrInvalid) {
			t.Fatalf("ParseAction(%q) error %v, want ErrInvalid", s, err)
		}
		msg := err.Error()
		if !strings.HasPrefix(msg, "action: ") {
			t.Errorf("ParseAction(%q) error %q does not name the field", s, msg)
		}
		for _, a := range fsm.Actions {
			if !strings.Contains(msg, string(a)) {
				t.Errorf("ParseAction(%q) error %q does not list %s", s, msg, a)
			}
		}
	}
}

func TestParseResult(t *testing.T) {
	for _, r := range fsm.Results {
		got, err := ParseResult(string(r))
		if err != nil || got != r {
			t.Errorf("ParseResult(%q) = (%q, %v)", r, got, err)
		}
	}
	if _, err := ParseResult("rejected"); !errors.Is(err, ErrInvalid) {
		t.Errorf("ParseResult(rejected) error %v, want ErrInvalid", err)
	}
}

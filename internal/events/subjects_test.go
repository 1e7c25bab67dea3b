package events

import (
	"testing"

	"github.com/vmherd/vmherd/api"
)

func TestParseCommandSubject(t *testing.T) {
	n := api.DefaultNames
	for _, c := range []struct {
		subj, vm, action, issuer string
		ok                       bool
	}{
		{"vm.cmd.web1.start", "web1", "start", "", true},
		{"vm.cmd.web1.start.alice", "web1", "start", "alice", true},
		{n.IssuedCommand("web1", "stop", "bob"), "web1", "stop", "bob", true},
		{n.IssuedCommand("web1", "stop", ""), "web1", "stop", "", true},
		{"vm.cmd.web1", "web1", "", "", false},
		{"vm.cmd.web1..alice", "web1.", "alice", "", false},
		{"vm.cmd.web.1.start", "web.1", "start", "", false},
		// An unknown action with an issuer is an unknown action, not a
		// dotted VM name (the last token is no action).
		{"vm.cmd.web1.reboot.alice", "web1", "reboot", "alice", true},
		{"vm.cmd.a.b.c.d", "a.b.c", "d", "", false},
		{"other.cmd.web1.start", "", "", "", false},
	} {
		name, action, issuer, ok := n.ParseCommandSubject(c.subj)
		if name != c.vm || action != c.action || issuer != c.issuer || ok != c.ok {
			t.Errorf("%s: got (%q, %q, %q, %v), want (%q, %q, %q, %v)", c.subj, name, action, issuer, ok, c.vm, c.action, c.issuer, c.ok)
		}
	}
}

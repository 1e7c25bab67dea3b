package events

import "testing"

func TestParseCommandSubject(t *testing.T) {
	n := DefaultNames
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
		{"vm.cmd.a.b.c.d", "a.b.c", "d", "", false},
		{"other.cmd.web1.start", "", "", "", false},
	} {
		name, action, issuer, ok := n.ParseCommandSubject(c.subj)
		if name != c.vm || action != c.action || issuer != c.issuer || ok != c.ok {
			t.Errorf("%s: got (%q, %q, %q, %v), want (%q, %q, %q, %v)", c.subj, name, action, issuer, ok, c.vm, c.action, c.issuer, c.ok)
		}
	}
}

func TestParseEventSubject(t *testing.T) {
	n := DefaultNames
	for _, c := range []struct {
		subj, vm string
		typ      Type
		writer   string
		ok       bool
	}{
		{n.Event("web1", TypeStarted, "h1"), "web1", TypeStarted, "h1", true},
		{n.Event("web1", TypeRejected, EngineWriter), "web1", TypeRejected, EngineWriter, true},
		{n.Accepted("web1", "h1"), "web1", TypeAccepted, EngineWriter, true},
		// Only an engine's accepted decision has a fifth token.
		{"vm.evt.web1.accepted.h1.h2", "", "", "", false},
		{"vm.evt.web1.started._engine.h1", "", "", "", false},
		{"vm.evt.web1.accepted._engine.", "", "", "", false},
		{"vm.evt.web1.started", "", "", "", false},
	} {
		name, typ, writer, ok := n.ParseEventSubject(c.subj)
		if name != c.vm || typ != c.typ || writer != c.writer || ok != c.ok {
			t.Errorf("%s: got (%q, %q, %q, %v), want (%q, %q, %q, %v)", c.subj, name, typ, writer, ok, c.vm, c.typ, c.writer, c.ok)
		}
	}
	ev := &Event{Type: TypeAccepted, VM: "web1", Host: "h1"}
	if got := n.EventSubject(ev, EngineWriter); got != "vm.evt.web1.accepted._engine.h1" {
		t.Errorf("EventSubject(accepted) = %s", got)
	}
	ev.Type = TypeStarted
	if got := n.EventSubject(ev, "h1"); got != "vm.evt.web1.started.h1" {
		t.Errorf("EventSubject(started) = %s", got)
	}
}

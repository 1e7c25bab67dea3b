package events

import (
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
)

func TestDecodeTask(t *testing.T) {
	ev := &Event{Type: TypeAccepted, VM: "web1", CommandID: "c1", Action: "start", Host: "h1", Backend: "noop", TimeoutS: 7}
	h := nats.Header{}
	h.Set(SourceHeader, "VM_EVENTS 42 > vm.task.h1.web1 vm.evt.web1.accepted._engine.h1")
	task, err := DecodeTask(ev.Encode(), h)
	if err != nil {
		t.Fatal(err)
	}
	if task.AcceptedSeq != 42 || task.VM != "web1" || task.Host != "h1" || task.Action != "start" || task.TimeoutS != 7 || task.Fence {
		t.Errorf("task = %+v", task)
	}
	for _, c := range []struct {
		header, want string
		ev           *Event
	}{
		{"", "no Nats-Stream-Source header", ev},
		{"VM_EVENTS x", "has no sequence", ev},
		{"VM_EVENTS 0 >", "has no sequence", ev},
		{"VM_EVENTS 3", "not an accepted decision", &Event{Type: TypeStarted, VM: "web1"}},
	} {
		h := nats.Header{}
		if c.header != "" {
			h.Set(SourceHeader, c.header)
		}
		if _, err := DecodeTask(c.ev.Encode(), h); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("header %q: err %v, want %q", c.header, err, c.want)
		}
	}
}

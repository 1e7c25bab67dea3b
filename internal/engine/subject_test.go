package engine_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/testenv"
)

// An unknown action sent with an issuer token (as vmctl and operators
// send every command) is rejected for its action, on the VM's own
// subject; it used to go to _invalid blaming the VM name "web1.reboot"
// (issue #22, item 8).
func TestUnknownActionBlamesTheAction(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(eng, "h1")
	m := nats.NewMsg(env.Names.IssuedCommand("web1", "reboot", "alice"))
	m.Data = []byte(`{"command_id":"rb1"}`)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := env.JS.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
	ev := env.Decision("web1", "rb1", 10*time.Second)
	if ev.Type != api.TypeRejected || !strings.Contains(ev.Reason, `unknown action "reboot"`) || strings.Contains(ev.Reason, "name") || ev.Issuer != "alice" {
		t.Fatalf("rejection: %+v", ev)
	}
}

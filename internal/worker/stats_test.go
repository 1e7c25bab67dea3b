package worker_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/schemas"
)

// The stats query answers a running VM's sample (valid against
// schemas/stats.json), 409 for a VM whose process does not run, 404 for
// a VM the worker does not know.
func TestStatsQuery(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: noop.New(noop.Options{})})
	env.WaitHost(eng, "h1")
	ask := func(name string) (code, msg string, body []byte) {
		t.Helper()
		m, err := env.NC.Request(env.Names.Query("h1")+".stats", []byte(`{"vm":"`+name+`"}`), 5*time.Second)
		if err != nil {
			t.Fatalf("stats %s: %v", name, err)
		}
		return m.Header.Get("Nats-Service-Error-Code"), m.Header.Get("Nats-Service-Error"), m.Data
	}
	step := func(action, id, body string, want api.EventType) {
		t.Helper()
		env.Send("s1", action, body, id)
		if r := env.Result("s1", id, 20*time.Second); r.Type != want {
			t.Fatalf("%s: %s (%s%s)", action, r.Type, r.Reason, r.Error)
		}
	}
	step("prepare", "p1", `{"spec":{"name":"s1","backend":"noop","vcpus":2,"memory_mb":128}}`, api.TypePrepared)
	if code, msg, _ := ask("s1"); code != "409" || !strings.Contains(msg, "noop vm s1 is prepared") {
		t.Fatalf("stats of a prepared VM: %s %q, want 409", code, msg)
	}
	step("start", "s1", "", api.TypeStarted)
	code, msg, body := ask("s1")
	if code != "" {
		t.Fatalf("stats of a running VM: %s %s", code, msg)
	}
	if err := schemas.Validate("stats", body); err != nil {
		t.Fatalf("reply breaks schemas/stats.json: %v\n%s", err, body)
	}
	var r api.StatsReply
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatal(err)
	}
	if r.VM != "s1" || r.Host != "h1" || r.Backend != api.BackendNoop || r.State != api.StateRunning || len(r.Vcpus) != 2 ||
		r.MemoryBytes != 128<<20 || !r.Simulated || r.StartedAt.IsZero() || r.UptimeMS < 0 {
		t.Fatalf("stats reply %+v", r)
	}
	step("stop", "t1", "", api.TypeStopped)
	if code, msg, _ := ask("s1"); code != "409" || !strings.Contains(msg, "not running") {
		t.Fatalf("stats of a stopped VM: %s %q, want 409", code, msg)
	}
	if code, msg, _ := ask("ghost"); code != "404" || !strings.Contains(msg, "no such vm") {
		t.Fatalf("stats of an unknown VM: %s %q, want 404", code, msg)
	}
}

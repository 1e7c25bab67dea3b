package worker_test

import (
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/testenv"
)

// A stop waiting out a long grace (a guest that ignores ACPI) no longer
// pins the VM: a destroy accepted after it cuts it short and runs at
// once; and the engine refuses a timeout_s over its limit (issue #26.5).
func TestDestroyCutsALongStopShort(t *testing.T) {
	t.Parallel()
	nb := noop.New(noop.Options{CallLatency: map[string]time.Duration{noop.CallStop: time.Hour}})
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb})
	env.WaitHost(eng, "h1")
	env.SendCmd("pinned", "prepare", "p1", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("pinned", "p1", 10*time.Second)
	env.SendCmd("pinned", "start", "s1", api.Command{})
	env.Result("pinned", "s1", 10*time.Second)

	env.SendCmd("pinned", "stop", "day-long", api.Command{TimeoutS: 86400})
	if ev := env.Decision("pinned", "day-long", 10*time.Second); ev.Type != api.TypeRejected || !strings.Contains(ev.Reason, "--max-command-timeout") {
		t.Fatalf("a stop with timeout_s 86400: %+v", ev)
	}

	env.SendCmd("pinned", "stop", "long", api.Command{TimeoutS: 600})
	env.WaitFor("the stop running", 10*time.Second, func() bool { return nb.Calls(noop.CallStop) == 1 })
	began := time.Now()
	env.SendCmd("pinned", "destroy", "d1", api.Command{})
	if ev := env.Result("pinned", "d1", 15*time.Second); ev.Type != api.TypeDestroyed {
		t.Fatalf("destroy after a long stop: %+v", ev)
	}
	t.Logf("destroyed %s after the destroy was sent", time.Since(began).Round(time.Millisecond))
	if ev := env.Result("pinned", "long", time.Second); ev.Type != api.TypeFailed || !strings.Contains(ev.Error, "cut short: destroy d1 was accepted") {
		t.Fatalf("the stop's result: %+v", ev)
	}
	env.CheckProjection(10 * time.Second)
}

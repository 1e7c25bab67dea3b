package vmctl

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
)

// A wait whose host goes away says so on its own line, on a stderr that
// is not a terminal, and once more when the wait goes on (here: never;
// the command is interrupted and said to be still carried out).
func TestWaitSaysTheHostIsLost(t *testing.T) {
	t.Parallel()
	nb := noop.New(noop.Options{CallLatency: map[string]time.Duration{"start": time.Minute}})
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{HostLostAfter: time.Second})
	w := env.StartWorker(testenv.WorkerConfig{Host: "h1", Noop: nb})
	env.WaitHost(eng, "h1")
	ctx := context.Background()
	if r := vmctl(t, ctx, env.URL, "create", "t1", "--backend", "noop"); r.code != 0 {
		t.Fatalf("create: %v", r)
	}
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var out, errOut syncbuf.Buffer
	done := make(chan int, 1)
	go func() { done <- Run(cctx, []string{"--server", env.URL, "start", "t1"}, &out, &errOut) }()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), "accepted on host h1") {
		if time.Now().After(deadline) {
			t.Fatalf("start never accepted:\n%s%s", out.String(), errOut.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	w.Kill()
	deadline = time.Now().Add(30 * time.Second)
	for !strings.Contains(errOut.String(), "host h1 is lost") {
		if time.Now().After(deadline) {
			t.Fatalf("no word of the lost host:\n%s", errOut.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := strings.Count(errOut.String(), "host h1 is lost"); n != 1 {
		t.Fatalf("the lost host said %d times, want once:\n%s", n, errOut.String())
	}
	cancel()
	if code := <-done; code != ExitInterrupted || !strings.Contains(errOut.String(), "will still be carried out") {
		t.Fatalf("interrupted: exit %d\n%s", code, errOut.String())
	}
}

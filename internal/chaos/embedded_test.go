package chaos_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/testenv"
)

// startEmbedded runs the single-host default: one engine process with its
// embedded NATS server (sync always) and its local worker, so a kill takes
// the server, the engine and the worker down together.
func (c *cluster) startEmbedded() {
	p := testenv.StartProc(c.t, "engine-embedded", filepath.Join(c.bin, "engine"), nil,
		"--listen", testenv.Addr(c.port), "--data-dir", c.embeddedDir(), "--engine-id", "e1", "--sync", "always",
		"--with-worker", "--host", "h1", "--backends", "noop", "--default-backend", "noop",
		"--noop-latency", c.noopLatency, "--noop-state-dir", filepath.Join(c.dir, "host-h1", "noop"),
		"--command-ack-wait", "2s", "--task-ack-wait", "2s", "--heartbeat", "500ms", "--reconcile", "2s",
		"--host-timeout", "10s", "--log-level", c.logLevel())
	p.WaitLog("engine serving", 60*time.Second)
	c.mu.Lock()
	c.engines["embedded"] = p
	c.logs = append(c.logs, p.Log)
	c.mu.Unlock()
}

func (c *cluster) embeddedDir() string { return filepath.Join(c.dir, "embedded") }

// TestKillEmbeddedEngine kills the whole single-host process (engine,
// embedded NATS server and local worker together) with SIGKILL at random
// moments under a closed-loop load, and restarts it at once on the same
// data dir: every accepted command must still get exactly one result,
// whatever the server remembered of its consumers' deliveries.
func TestKillEmbeddedEngine(t *testing.T) {
	c := newEmbedded(t)
	c.cycle = []string{"prepare", "start", "suspend", "resume", "stop", "destroy"}
	c.loadTimeout = 4 * time.Minute
	c.untilFaults = true
	c.startEmbedded()
	env := testenv.AttachCreds(t, fmt.Sprintf("nats://%s", testenv.Addr(c.port)), filepath.Join(c.embeddedDir(), "auth", "admin.creds"))
	const vms, perVM, wantKills = 30, 68, 8 // >= 2,040 commands
	kills := 0
	stats := c.runLoad(env, vms, perVM, func(ctx context.Context) {
		for kills < wantKills {
			select {
			case <-ctx.Done():
				return
			case <-time.After(1500*time.Millisecond + rand.N(2500*time.Millisecond)):
			}
			c.mu.Lock()
			p := c.engines["embedded"]
			c.mu.Unlock()
			p.Kill()
			c.startEmbedded()
			kills++
		}
	})
	if kills < wantKills {
		t.Errorf("only %d kills happened during the load (want %d)", kills, wantKills)
	}
	if n := stats.sent.Load(); n < 2000 {
		t.Errorf("only %d commands were sent (want >= 2,000)", n)
	}
	counts := c.verify(env, stats)
	c.explainLost(env, counts)
	fmt.Printf("FAULT-TEST %s: commands=%d kills=%d decisions=%d results=%d lost=%d twice=%d\n",
		t.Name(), stats.sent.Load(), kills, counts.Accepted+counts.Rejected, counts.Results, counts.Lost, counts.Duplicates)
}

// newEmbedded is a cluster without a separate nats-server: the engine
// process embeds it.
func newEmbedded(t *testing.T) *cluster {
	if testing.Short() {
		t.Skip("fault tests run real processes; skipped with -short")
	}
	return &cluster{
		t: t, bin: testenv.Binaries(t), dir: t.TempDir(), port: testenv.FreePort(t),
		engines: map[string]*testenv.Proc{}, workers: map[string]*testenv.Proc{},
		noopLatency: "20ms",
	}
}

// explainLost logs what is known of each lost command: its task (still
// queued or not) and the log lines of every engine run that name it.
func (c *cluster) explainLost(env *testenv.Env, counts testenv.Counts) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tasks, err := env.JS.Stream(ctx, env.Names.TasksStream())
	if err != nil {
		c.t.Logf("tasks stream: %v", err)
		return
	}
	for _, lost := range counts.LostCommands {
		f := strings.Fields(lost)
		queued := "no task queued"
		if m, err := tasks.GetLastMsgForSubject(ctx, env.Names.Task("h1", f[0])); err == nil {
			queued = fmt.Sprintf("task queued at seq %d: %s", m.Sequence, m.Data)
		}
		c.t.Logf("lost: %s; %s", lost, queued)
		for i, l := range c.logs {
			data, _ := os.ReadFile(l)
			for _, line := range strings.Split(string(data), "\n") {
				if strings.Contains(line, f[1]) {
					c.t.Logf("  run %d: %s", i, line)
				}
			}
		}
	}
}

// logLevel of the embedded engine: VMHERD_CHAOS_LOG_LEVEL, else info.
func (c *cluster) logLevel() string {
	if l := os.Getenv("VMHERD_CHAOS_LOG_LEVEL"); l != "" {
		return l
	}
	return "info"
}

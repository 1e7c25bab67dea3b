// Package chaos_test proves the invariants of docs/architecture.md under faults: real
// engine, worker and nats-server processes, killed and restarted at random
// moments under a load of 500+ lifecycle commands over 50+ VMs, then
// checked from the streams themselves (and the Noop backend's effect log).
package chaos_test

import (
	"context"
	"testing"
	"time"
)

const (
	loadVMs   = 50
	loadPerVM = 11 // 550 commands
	wantKills = 4  // kills of a worker or engine during one load
)

func TestKillWorker(t *testing.T) {
	c := newCluster(t)
	c.startEngine("e1")
	c.startWorker("h1", 0)
	c.startWorker("h2", 0)
	env := c.attach()
	// The load runs on past its 550 commands until the kills are done: a
	// fast machine finished it after two kills once.
	c.untilFaults = true
	kills := 0
	stats := c.runLoad(env, loadVMs, loadPerVM, func(ctx context.Context) {
		kills = atMost(ctx, wantKills, 200*time.Millisecond, time.Second, func() {
			c.killWorker([]string{"h1", "h2"}[kills%2], 0)
			kills++
		})
	})
	t.Logf("killed a worker %d times", kills)
	if kills < wantKills {
		t.Errorf("only %d kills happened during the load, want %d", kills, wantKills)
	}
	c.verify(env, stats)
}

func TestKillEngine(t *testing.T) {
	c := newCluster(t)
	c.startEngine("e1")
	c.startWorker("h1", 0)
	env := c.attach()
	c.untilFaults = true
	kills := 0
	stats := c.runLoad(env, loadVMs, loadPerVM, func(ctx context.Context) {
		kills = atMost(ctx, wantKills, 200*time.Millisecond, time.Second, func() { c.killEngine("e1") })
	})
	t.Logf("killed the engine %d times", kills)
	if kills < wantKills {
		t.Errorf("only %d kills happened during the load, want %d", kills, wantKills)
	}
	c.verify(env, stats)
}

func TestRestartNatsServer(t *testing.T) {
	c := newCluster(t)
	c.startEngine("e1")
	c.startWorker("h1", 0)
	env := c.attach()
	c.untilFaults = true
	restarts := 0
	stats := c.runLoad(env, loadVMs, loadPerVM, func(ctx context.Context) {
		// Once the load is well under way, stop and restart the server.
		select {
		case <-ctx.Done():
			return
		case <-time.After(1500 * time.Millisecond):
		}
		c.restartServer()
		restarts++
	})
	if restarts != 1 {
		t.Errorf("server restarted %d times, want 1 (the load finished first?)", restarts)
	}
	c.verify(env, stats)
}

func TestTwoEnginesTwoWorkersPerHost(t *testing.T) {
	c := newCluster(t)
	c.startEngine("e1")
	c.startEngine("e2")
	for _, h := range []string{"h1", "h2"} {
		c.startWorker(h, 0)
		c.startWorker(h, 1)
	}
	env := c.attach()
	stats := c.runLoad(env, loadVMs, loadPerVM, nil)
	c.verify(env, stats)
}

// A backend call longer than the task consumer's ack wait (2s) is not
// redone: the worker signals progress while it runs.
func TestSlowCallsLongerThanAckWait(t *testing.T) {
	c := newCluster(t)
	c.noopLatency = "2500ms"
	c.startEngine("e1")
	c.startWorker("h1", 0)
	c.startWorker("h1", 1)
	env := c.attach()
	// Fewer, slower commands: each call outlives the ack wait.
	stats := c.runLoad(env, 50, 3, nil)
	c.verify(env, stats)
}

package chaos_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fleet"
	"github.com/vmherd/vmherd/internal/testenv"
)

// maxNodeStall is the longest the fleet may go without a result when a
// NATS node dies: nats-server elects a new stream leader in 4 to 9 s.
const maxNodeStall = 15 * time.Second

// TestFleetNatsNodeKills runs the load on the fleet topology (a 3-node
// NATS cluster with R3 streams, two engines, two hosts each in its own
// network namespace) and kills -9 one NATS node after another while it
// runs: first the leader of VM_EVENTS, then the leader of VM_TASKS, then
// the leader of VM_COMMANDS at that moment, each restarted before the
// next kill. Afterwards the invariants are checked as in every fault
// test, and the longest stall (last result before a kill to the first
// after it) must stay under maxNodeStall.
func TestFleetNatsNodeKills(t *testing.T) {
	if testing.Short() {
		t.Skip("fault tests run real processes; skipped with -short")
	}
	testenv.Require(t, os.Geteuid() == 0, "the fleet's network namespaces need root")
	testenv.Tool(t, "nats")
	dir := t.TempDir()
	workerArgs := []string{"--noop-latency", "20ms", "--task-ack-wait", "5s", "--reconcile", "2s"}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	f, err := fleet.Up(ctx, fleet.Config{
		Dir: dir, Bin: testenv.Binaries(t), NatsServer: testenv.Tool(t, "nats-server"), Log: t.Logf,
		Hosts: []fleet.HostConfig{
			{Name: "h1", Backends: "noop", WorkerArgs: workerArgs},
			{Name: "h2", Backends: "noop", WorkerArgs: workerArgs},
		},
		EngineArgs: []string{"--command-ack-wait", "5s", "--host-timeout", "20s"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("fleet logs:\n%s", f.Logs())
		}
		f.Down()
	})
	c := &cluster{t: t, dir: dir, untilFaults: true}
	env := testenv.Attach(t, f.URLs)

	leader := func(stream string) int {
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
			sctx, scancel := context.WithTimeout(ctx, 2*time.Second)
			st, err := env.JS.Stream(sctx, stream)
			scancel()
			if err != nil {
				continue
			}
			if ci := st.CachedInfo().Cluster; ci != nil && ci.Leader != "" {
				for i, n := range f.Nodes {
					if n.Name == ci.Leader {
						return i
					}
				}
			}
		}
		t.Errorf("no leader of %s within 30s", stream)
		return 0
	}
	type kill struct {
		node, role string
		at         time.Time
	}
	var kills []kill
	names := events.DefaultNames
	stats := c.runLoad(env, loadVMs, 10, func(fctx context.Context) {
		for _, stream := range []string{names.EventsStream(), names.TasksStream(), names.CommandsStream()} {
			select {
			case <-fctx.Done():
				return
			case <-time.After(3 * time.Second): // the load runs on the healthy cluster
			}
			i := leader(stream)
			k := kill{node: f.Nodes[i].Name, role: "leader of " + stream, at: time.Now()}
			f.Nodes[i].Kill()
			kills = append(kills, k)
			t.Logf("killed %s (%s)", k.node, k.role)
			time.Sleep(5 * time.Second)
			if err := f.RestartNode(i); err != nil {
				t.Errorf("restarting %s: %v", k.node, err)
				return
			}
			time.Sleep(5 * time.Second) // it catches up before the next kill
		}
		time.Sleep(3 * time.Second) // results after the last restart
	})
	var longest time.Duration
	var report []string
	for _, k := range kills {
		s := stats.tr.stall(k.at)
		report = append(report, fmt.Sprintf("%s(%s) stall=%s", k.node, k.role, s.Round(time.Millisecond)))
		if s < 0 {
			t.Errorf("no results around the kill of %s", k.node)
		}
		longest = max(longest, s)
	}
	if len(kills) != 3 {
		t.Errorf("%d node kills happened during the load, want 3", len(kills))
	}
	if longest > maxNodeStall {
		t.Errorf("longest stall %s, want at most %s", longest, maxNodeStall)
	}
	counts := c.verify(env, stats)
	fmt.Printf("FAULT-TEST %s: node kills: %s; longest stall %s; %s; %s\n", t.Name(),
		strings.Join(report, ", "), longest.Round(time.Millisecond), stats, counts)
}

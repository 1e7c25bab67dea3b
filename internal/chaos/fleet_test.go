package chaos_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/fleet"
	"github.com/vmherd/vmherd/internal/testenv"
)

// noopFleet brings up the fleet topology with two Noop hosts, h1 and h2,
// and engines that call a host lost after hostTimeout; it is taken down
// when the test ends (its logs printed if it failed).
func noopFleet(t *testing.T, ctx context.Context, hostTimeout string) (*fleet.Fleet, *cluster, *testenv.Env) {
	t.Helper()
	workerArgs := []string{"--noop-latency", "20ms", "--task-ack-wait", "5s", "--reconcile", "2s"}
	f := upFleet(t, ctx, fleet.Config{
		Hosts: []fleet.HostConfig{
			{Name: "h1", Backends: "noop", WorkerArgs: workerArgs},
			{Name: "h2", Backends: "noop", WorkerArgs: workerArgs},
		},
		EngineArgs: []string{"--command-ack-wait", "5s", "--host-timeout", hostTimeout},
	})
	return f, &cluster{t: t, dir: f.Dir()}, testenv.AttachTLS(t, f.URLs, f.AdminCreds(), f.TLS.CA)
}

// upFleet brings up the fleet topology of cfg (its directory, binaries and
// nats-server filled in) and takes it down when the test ends, printing
// its logs if the test failed.
func upFleet(t *testing.T, ctx context.Context, cfg fleet.Config) *fleet.Fleet {
	t.Helper()
	if testing.Short() {
		t.Skip("fault tests run real processes; skipped with -short")
	}
	testenv.Require(t, os.Geteuid() == 0, "the fleet's network namespaces need root")
	if cfg.Bin == "" {
		cfg.Bin = testenv.Binaries(t)
	}
	cfg.Dir, cfg.NatsServer, cfg.Log = t.TempDir(), testenv.Tool(t, "nats-server"), t.Logf
	f, err := fleet.Up(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("fleet logs:\n%s", f.Logs())
		}
		f.Down()
	})
	return f
}

// streamLeader is the index in f.Nodes of the node leading stream, read
// from the stream's info for up to 30 s (an election may be under way).
func streamLeader(ctx context.Context, f *fleet.Fleet, js jetstream.JetStream, stream string) (int, bool) {
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		sctx, scancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := js.Stream(sctx, stream)
		scancel()
		if err != nil {
			continue
		}
		if ci := st.CachedInfo().Cluster; ci != nil && ci.Leader != "" {
			for i, n := range f.Nodes {
				if n.Name == ci.Leader {
					return i, true
				}
			}
		}
	}
	return 0, false
}

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
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	f, c, env := noopFleet(t, ctx, "20s")
	c.untilFaults = true

	leader := func(stream string) int {
		i, ok := streamLeader(ctx, f, env.JS, stream)
		if !ok {
			t.Errorf("no leader of %s within 30s", stream)
		}
		return i
	}
	type kill struct {
		node, role string
		at         time.Time
	}
	var kills []kill
	names := api.DefaultNames
	// stored counts what VM_EVENTS holds (0 when it cannot be read).
	stored := func(ctx context.Context) uint64 {
		st, err := env.JS.Stream(ctx, names.EventsStream())
		if err != nil {
			return 0
		}
		return st.CachedInfo().State.Msgs
	}
	stats := c.runLoad(env, loadVMs, 10, func(fctx context.Context) {
		for _, stream := range []string{names.EventsStream(), names.TasksStream(), names.CommandsStream()} {
			// The load runs on the healthy cluster for 3 s, and until it
			// has stored events since the last kill (a loaded machine can
			// take longer than 3 s to get the first results through), so
			// every kill has results before it to measure a stall from.
			from := stored(fctx)
			select {
			case <-fctx.Done():
				return
			case <-time.After(3 * time.Second):
			}
			for deadline := time.Now().Add(time.Minute); stored(fctx) < from+20 && time.Now().Before(deadline); {
				time.Sleep(200 * time.Millisecond)
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

// TestFleetHostNetworkCut takes host h1 off the network (its veth down)
// for 30 s while commands for its VMs and for h2's arrive, then puts it
// back. h2's VMs are served throughout; each of h1's commands is either
// rejected naming the lost host, or accepted and carried out once h1 is
// back; nothing is lost or applied twice, and h1's VMs take commands
// again afterwards.
func TestFleetHostNetworkCut(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	f, c, env := noopFleet(t, ctx, "10s")
	tr := &tracker{decision: map[string]api.EventType{}, result: map[string]api.EventType{}, changed: make(chan struct{}, 1)}
	tctx, tcancel := context.WithCancel(ctx)
	defer tcancel()
	go tr.run(tctx, env.JS)
	stats := &loadStats{tr: tr}

	// send publishes one command (extra: more body fields) and waits until
	// it is finished (rejected, or accepted with its result), up to within.
	seq := 0
	send := func(name, action, extra string, within time.Duration) (api.EventType, error) {
		seq++
		id := fmt.Sprintf("%s-%s-%d", name, action, seq)
		body := fmt.Sprintf(`{"command_id":%q%s}`, id, extra)
		if err := publish(ctx, env.JS, env.Names.Command(name, action), body, id); err != nil {
			return "", err
		}
		stats.sent.Add(1)
		deadline := time.Now().Add(within)
		for {
			if ty, ok := tr.done(name + "/" + id); ok {
				if ty == api.TypeRejected {
					stats.rejected.Add(1)
				} else {
					stats.accepted.Add(1)
					stats.results.Add(1)
				}
				return ty, nil
			}
			if time.Now().After(deadline) {
				return "", fmt.Errorf("%s %s (%s) not finished within %s", action, name, id, within)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	vms := map[string][]string{}
	// h1 gets a VM per command it will be sent during the cut, so each
	// is decided on a settled VM: accepted while h1 still counts as alive,
	// rejected once it is lost.
	for h, n := range map[string]int{"h1": 12, "h2": 5} {
		for i := range n {
			name := fmt.Sprintf("%s-vm%d", h, i)
			vms[h] = append(vms[h], name)
			prep := fmt.Sprintf(`,"host":%q,"spec":{"backend":"noop","memory_mb":64}`, h)
			if ty, err := send(name, "prepare", prep, time.Minute); err != nil || ty != api.TypePrepared {
				t.Fatalf("prepare %s: %s %v", name, ty, err)
			}
			if ty, err := send(name, "start", "", time.Minute); err != nil || ty != api.TypeStarted {
				t.Fatalf("start %s: %s %v", name, ty, err)
			}
		}
	}

	if err := f.CutHost("h1", true); err != nil {
		t.Fatal(err)
	}
	cutAt := time.Now()
	t.Logf("host h1 cut off")
	// During the cut: h2's VMs keep working (a stop/start each, every few
	// seconds); h1's get commands too, which are published without waiting.
	pending := map[string]string{} // h1 command id -> vm
	for round := 0; time.Since(cutAt) < 30*time.Second; round++ {
		for _, name := range vms["h2"] {
			action := []string{"stop", "start"}[round%2]
			if ty, err := send(name, action, "", 20*time.Second); err != nil || ty == api.TypeRejected || ty == api.TypeFailed {
				t.Errorf("h2's %s %s during h1's cut: %s %v", action, name, ty, err)
			}
		}
		if round < len(vms["h1"]) {
			name := vms["h1"][round]
			seq++
			id := fmt.Sprintf("%s-cut-%d", name, seq)
			if err := publish(ctx, env.JS, env.Names.Command(name, "suspend"), fmt.Sprintf(`{"command_id":%q}`, id), id); err != nil {
				t.Fatal(err)
			}
			stats.sent.Add(1)
			pending[id] = name
		}
		time.Sleep(2 * time.Second)
	}
	if err := f.CutHost("h1", false); err != nil {
		t.Fatal(err)
	}
	t.Logf("host h1 back after %s", time.Since(cutAt).Round(time.Second))

	// Every command sent to h1 during the cut ends: rejected naming the
	// host, or accepted and answered now that h1 is back.
	rejectedLost, answered := 0, 0
	for deadline := time.Now().Add(2 * time.Minute); len(pending) > 0; {
		for id, name := range pending {
			ty, ok := tr.done(name + "/" + id)
			if !ok {
				continue
			}
			delete(pending, id)
			if ty == api.TypeRejected {
				rejectedLost++
				stats.rejected.Add(1)
			} else {
				answered++
				stats.accepted.Add(1)
				stats.results.Add(1)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d commands for h1's VMs never finished after h1 came back: %v", len(pending), pending)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// A rejection during the cut names the lost host. The events are read
	// until every rejection the tracker saw is there (a read of the whole
	// stream under load can come back short).
	lostReasons, others := 0, 0
	env.WaitFor("the rejections of h1's commands in the stream", 30*time.Second, func() bool {
		lostReasons, others = 0, 0
		for _, s := range env.AllEvents() {
			ev := s.Event
			if ev == nil || ev.Type != api.TypeRejected || !strings.Contains(ev.CommandID, "-cut-") {
				continue
			}
			if strings.Contains(ev.Reason, "host h1 of vm") && strings.Contains(ev.Reason, "is lost") {
				lostReasons++
			} else {
				others++
				t.Logf("%s rejected during h1's cut for another reason: %s", ev.CommandID, ev.Reason)
			}
		}
		return lostReasons+others == rejectedLost
	})
	if others > 0 {
		t.Errorf("%d of h1's commands were rejected for another reason than its lost host", others)
	}
	if lostReasons == 0 || answered == 0 {
		t.Errorf("of h1's commands during a 30 s cut, %d were rejected as its host lost and %d carried out: want some of each (host timeout 10 s)", lostReasons, answered)
	}
	// h1 is back in placement and its VMs take commands again.
	for deadline := time.Now().Add(time.Minute); ; {
		ty, err := send(vms["h1"][0], "stop", "", 30*time.Second)
		if err == nil && ty == api.TypeStopped {
			break
		}
		if ty != api.TypeRejected || time.Now().After(deadline) {
			t.Fatalf("stop of %s after h1 came back: %s %v", vms["h1"][0], ty, err)
		}
		time.Sleep(time.Second)
	}
	counts := c.verify(env, stats)
	fmt.Printf("FAULT-TEST %s: h1 cut for 30s: %d of its commands rejected (%d as its host lost), %d carried out after it came back; %s; %s\n",
		t.Name(), rejectedLost, lostReasons, answered, stats, counts)
}

// TestFleetHostLostForGood: a host dies (its worker killed, its network
// cut) with VMs on it. Its VMs read unknown; an operator forgets them
// (destroy --forget) from another host's namespace, prepares some of the
// names again elsewhere, and forgets the host. Then the host comes back
// after all, with its old state: its worker fences every forgotten VM
// (fenced events, its Noop state emptied) and touches none of the VMs
// that now carry those names on h2. No name runs on two hosts.
func TestFleetHostLostForGood(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	f, _, env := noopFleet(t, ctx, "5s")
	h2 := f.Hosts["h2"].NetNS
	vmctl := func(netns string, args ...string) string {
		t.Helper()
		out, code := f.Vmctl(ctx, netns, args...)
		if code != 0 {
			t.Fatalf("vmctl %v (netns %q): exit %d\n%s", args, netns, code, out)
		}
		return out
	}
	var onH1 []string
	for i := range 6 {
		name := fmt.Sprintf("lost%d", i)
		onH1 = append(onH1, name)
		vmctl("", "create", name, "--backend", "noop", "--host", "h1", "--start")
	}
	vmctl("", "create", "stay", "--backend", "noop", "--host", "h2", "--start")
	// noopState reports whether h1's Noop backend holds the VM (its state
	// file, which a destroy turns into a tombstone with state destroyed).
	noopState := func(name string) bool {
		b, err := os.ReadFile(fmt.Sprintf("%s/host-h1/noop/%s.json", f.Dir(), name))
		var e struct{ State string }
		return err == nil && json.Unmarshal(b, &e) == nil && e.State != "destroyed"
	}
	for _, n := range onH1 {
		if !noopState(n) {
			t.Fatalf("no Noop state of %s on h1 (looked in %s/host-h1/noop)", n, f.Dir())
		}
	}

	f.Workers["h1"].Kill()
	if err := f.CutHost("h1", true); err != nil {
		t.Fatal(err)
	}
	diedAt := time.Now()
	var lostAfter time.Duration
	env.WaitFor("h1 lost in vmctl hosts", time.Minute, func() bool {
		out, _ := f.Vmctl(ctx, h2, "hosts")
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) > 1 && f[0] == "h1" && f[1] == "lost" {
				lostAfter = time.Since(diedAt)
				return true
			}
		}
		return false
	})
	if out := vmctl(h2, "list"); strings.Count(out, "unknown (host lost; last running)") != len(onH1) {
		t.Fatalf("list while h1 is lost:\n%s", out)
	}
	if out, code := f.Vmctl(ctx, h2, "destroy", onH1[0]); code == 0 || !strings.Contains(out, "--forget") {
		t.Fatalf("destroy on the lost host: exit %d\n%s", code, out)
	}
	forgetStart := time.Now()
	for _, n := range onH1 {
		vmctl(h2, "destroy", "--forget", n)
	}
	forgetTook := time.Since(forgetStart)
	for _, n := range onH1[:3] {
		vmctl(h2, "create", n, "--backend", "noop", "--start")
	}
	vmctl(h2, "host", "forget", "h1")
	if out := vmctl(h2, "hosts"); strings.Contains(out, "h1") {
		t.Fatalf("hosts after forgetting h1:\n%s", out)
	}

	// The host comes back after all, with the state it had.
	if err := f.CutHost("h1", false); err != nil {
		t.Fatal(err)
	}
	if err := f.StartWorker("h1"); err != nil {
		t.Fatal(err)
	}
	fenced := func() int {
		n := 0
		for _, s := range env.AllEvents() {
			if s.Event != nil && s.Event.Type == api.TypeFenced && s.Event.Host == "h1" {
				n++
			}
		}
		return n
	}
	env.WaitFor("h1 fences its forgotten VMs", 2*time.Minute, func() bool { return fenced() == len(onH1) })
	for _, n := range onH1 {
		if noopState(n) {
			t.Errorf("%s still has Noop state on h1 after fencing", n)
		}
	}
	out := vmctl(h2, "list")
	for _, n := range append(onH1[:3:3], "stay") {
		if !regexpLine(out, n, "running", "h2") {
			t.Errorf("%s is not running on h2 after h1 came back:\n%s", n, out)
		}
	}
	for _, n := range onH1[3:] {
		if strings.Contains(out, n+" ") {
			t.Errorf("forgotten %s is listed:\n%s", n, out)
		}
	}
	if !strings.Contains(vmctl(h2, "events"), "host=h1 host_forgotten") {
		t.Errorf("no host_forgotten event")
	}
	env.CheckProjection(time.Minute)
	fmt.Printf("FAULT-TEST %s: h1 died with %d VMs; lost in vmctl after %s; %d forgotten in %s, %d prepared again on h2; host forgotten; on its return %d fenced, 0 running twice\n",
		t.Name(), len(onH1), lostAfter.Round(100*time.Millisecond), len(onH1), forgetTook.Round(time.Millisecond), 3, fenced())
}

// regexpLine reports whether some line of out starts with name and has
// the given words as later fields.
func regexpLine(out, name string, words ...string) bool {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != name {
			continue
		}
		ok := true
		for _, w := range words {
			if !slicesContains(f[1:], w) {
				ok = false
			}
		}
		if ok {
			return true
		}
	}
	return false
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

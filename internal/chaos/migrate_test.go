package chaos_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/testenv"
)

// noopCopies reads where each VM's Noop copy is, across the hosts' state
// dirs: host -> state ("incoming" for a copy waiting for its switch).
func (c *cluster) noopCopies(name string) map[string]string {
	out := map[string]string{}
	dirs, _ := filepath.Glob(filepath.Join(c.dir, "host-*", "noop"))
	for _, d := range dirs {
		host := strings.TrimPrefix(filepath.Base(filepath.Dir(d)), "host-")
		data, err := os.ReadFile(filepath.Join(d, name+".json"))
		if err != nil {
			continue
		}
		var e struct {
			State api.VmState `json:"state"`
		}
		if json.Unmarshal(data, &e) == nil && e.State != api.StateDestroyed {
			out[host] = string(e.State)
		}
	}
	return out
}

// record reads a VM's record from the bucket once the projection has
// folded its last event.
func record(t *testing.T, env *testenv.Env, name string) *api.VmRecord {
	t.Helper()
	var rec *api.VmRecord
	env.WaitFor("the record of "+name+" to fold its last event", 20*time.Second, func() bool {
		evs := env.Events(name)
		if len(evs) == 0 {
			return false
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		kv, err := env.JS.KeyValue(ctx, env.Names.RecordsBucket())
		if err != nil {
			return false
		}
		e, err := kv.Get(ctx, name)
		if err != nil {
			return false
		}
		rec, err = api.UnmarshalRecord(e.Value())
		return err == nil && rec.LastSeq >= evs[len(evs)-1].Seq
	})
	return rec
}

// do sends a command and returns its result (or its rejection).
func do(t *testing.T, env *testenv.Env, name, action, id string, cmd api.Command) *api.Event {
	t.Helper()
	env.SendCmd(name, action, id, cmd)
	return env.Result(name, id, time.Minute)
}

// TestMigrateNoop drives the migrate protocol end to end with real
// engine and worker processes and the Noop backend's simulated copy:
// live and back, suspended, cold, a placed destination, the rejections,
// and a cancel during the copy; after each, the record names the host
// that holds the VM and no other host holds a copy.
func TestMigrateNoop(t *testing.T) {
	c := newCluster(t)
	c.workerArgs = []string{"--noop-migrate-latency", "3s"}
	c.startEngine("e1")
	c.startWorker("h1", 0)
	c.startWorker("h2", 0)
	env := c.attach()
	onlyOn := func(name, host string, state api.VmState) {
		t.Helper()
		rec := record(t, env, name)
		if rec.Host != host || rec.State != state || rec.Migration != nil {
			t.Fatalf("record of %s: host %s state %s migration %+v; want host %s state %s", name, rec.Host, rec.State, rec.Migration, host, state)
		}
		env.WaitFor(name+" only on "+host, 20*time.Second, func() bool {
			cp := c.noopCopies(name)
			return len(cp) == 1 && cp[host] == string(state)
		})
	}
	want := func(ev *api.Event, ty api.EventType) {
		t.Helper()
		if ev.Type != ty {
			t.Fatalf("%s %s: got %s (%s%s), want %s", ev.Action, ev.CommandID, ev.Type, ev.Reason, ev.Error, ty)
		}
	}

	want(do(t, env, "m1", "prepare", "p1", api.Command{Host: "h1", Spec: &api.VmSpec{Backend: api.BackendNoop}}), api.TypePrepared)
	want(do(t, env, "m1", "start", "s1", api.Command{}), api.TypeStarted)

	// Live to h2 and back (placed: the only other host).
	ev := do(t, env, "m1", "migrate", "mg1", api.Command{Host: "h2"})
	want(ev, api.TypeMigrated)
	if ev.Migration == nil || ev.Migration.From != "h1" || ev.Migration.To != "h2" || ev.Migration.Mode != api.MigrateLive || ev.Host != "h2" || ev.Handle == nil {
		t.Fatalf("migrated event: %+v", ev)
	}
	onlyOn("m1", "h2", api.StateRunning)
	want(do(t, env, "m1", "migrate", "mg2", api.Command{}), api.TypeMigrated)
	onlyOn("m1", "h1", api.StateRunning)
	// It is the same VM: commands reach it on its new host.
	want(do(t, env, "m1", "suspend", "su1", api.Command{}), api.TypeSuspended)
	want(do(t, env, "m1", "migrate", "mg3", api.Command{Host: "h2"}), api.TypeMigrated)
	onlyOn("m1", "h2", api.StateSuspended)
	want(do(t, env, "m1", "stop", "st1", api.Command{}), api.TypeStopped)
	ev = do(t, env, "m1", "migrate", "mg4", api.Command{Host: "h1"})
	want(ev, api.TypeMigrated)
	if ev.Migration.Mode != api.MigrateCold {
		t.Errorf("a stopped vm moved %s, want cold", ev.Migration.Mode)
	}
	onlyOn("m1", "h1", api.StateStopped)
	want(do(t, env, "m1", "start", "s2", api.Command{}), api.TypeStarted)

	// Rejections, each with its reason.
	for _, tc := range []struct {
		id   string
		cmd  api.Command
		want string
	}{
		{"r1", api.Command{Host: "h1"}, "already on host h1"},
		{"r2", api.Command{Host: "h9"}, `"h9" is not a known host`},
		{"r3", api.Command{Cancel: true}, "no migration in flight"},
	} {
		ev := do(t, env, "m1", "migrate", tc.id, tc.cmd)
		if ev.Type != api.TypeRejected || !strings.Contains(ev.Reason, tc.want) {
			t.Errorf("migrate %+v: %s %q, want rejected with %q", tc.cmd, ev.Type, ev.Reason, tc.want)
		}
	}

	// A cancel during the copy: the vm stays on h1, running; the copy on
	// h2 is removed; commands sent meanwhile are rejected as in flight.
	env.SendCmd("m1", "migrate", "mg5", api.Command{Host: "h2"})
	env.WaitFor("the copy on h2", 20*time.Second, func() bool { return c.noopCopies("m1")["h2"] == "incoming" })
	if ev := do(t, env, "m1", "stop", "st2", api.Command{}); ev.Type != api.TypeRejected || !strings.Contains(ev.Reason, "migrating") {
		t.Errorf("stop while migrating: %s %q, want rejected as migrating", ev.Type, ev.Reason)
	}
	// vmctl hosts shows it leaving h1 for h2 (once the bucket has the
	// migrating record: a transitional one is written within 500 ms).
	if rec := record(t, env, "m1"); rec.State != api.StateMigrating {
		t.Fatalf("record during the copy: %s", rec.State)
	}
	out, err := exec.Command(filepath.Join(c.bin, "vmctl"), "--server", c.url, "--creds", c.creds(auth.Identity{Role: auth.RoleAdmin}),
		"--tls-ca", c.pki.CA, "hosts").CombinedOutput()
	if err != nil || !regexp.MustCompile(`h1 .* 1 \(1 leaving\)`).Match(out) || !regexp.MustCompile(`h2 .* 0 \(1 arriving\)`).Match(out) {
		t.Errorf("vmctl hosts during a migration: %v\n%s", err, out)
	}
	env.SendCmd("m1", "migrate", "c1", api.Command{Cancel: true})
	if d := env.Decision("m1", "c1", 30*time.Second); d.Type != api.TypeAccepted || !d.Cancel || d.State != api.StateRunning {
		t.Fatalf("cancel: %+v", d)
	}
	res := env.Result("m1", "mg5", 30*time.Second)
	if res.Type != api.TypeFailed || res.Migration == nil || res.Migration.CancelledBy != "c1" {
		t.Fatalf("the cancelled migrate's result: %+v", res)
	}
	onlyOn("m1", "h1", api.StateRunning)
	// A migrate's timeout_s bounds its send (the copy takes 3 s here).
	if ev := do(t, env, "m1", "migrate", "mg6", api.Command{Host: "h2", TimeoutS: 1}); ev.Type != api.TypeFailed || !strings.Contains(ev.Error, "timeout_s") {
		t.Fatalf("a migrate over its timeout_s: %s %q", ev.Type, ev.Error)
	}
	onlyOn("m1", "h1", api.StateRunning)
	want(do(t, env, "m1", "destroy", "d1", api.Command{}), api.TypeDestroyed)
	env.WaitFor("m1 gone", 20*time.Second, func() bool { return len(c.noopCopies("m1")) == 0 })
	counts := env.CheckStreams()
	if counts.Duplicates != 0 || counts.Lost != 0 || counts.Cancels != 1 {
		t.Errorf("streams: %s, cancels %d", counts, counts.Cancels)
	}
	t.Logf("streams: %s", counts)
}

// TestMigrateFaults kills the source's worker, the target's worker and
// the engine at random moments while VMs migrate back and forth between
// two hosts (Noop backend, 400 ms copies), then checks from what is
// stored and what each host holds: every migrate ended in exactly one
// result, every VM is held by exactly the host its record names (never
// both, never none) in the state its record says, and nothing is lost
// or decided twice.
func TestMigrateFaults(t *testing.T) {
	c := newCluster(t)
	c.workerArgs = []string{"--noop-migrate-latency", "400ms"}
	c.startEngine("e1")
	c.startWorker("h1", 0)
	c.startWorker("h2", 0)
	env := c.attach()
	const vms, rounds = 8, 6
	names := make([]string, vms)
	for i := range names {
		names[i] = fmt.Sprintf("mf%02d", i)
		env.SendCmd(names[i], "prepare", names[i]+"-p", api.Command{Host: []string{"h1", "h2"}[i%2], Spec: &api.VmSpec{Backend: api.BackendNoop}})
	}
	t.Cleanup(func() {
		if t.Failed() {
			c.mu.Lock()
			defer c.mu.Unlock()
			for name, p := range c.workers {
				t.Logf("worker %s:\n%s", name, tailOf(p.Output(), 4000))
			}
			for name, p := range c.engines {
				t.Logf("engine %s:\n%s", name, tailOf(p.Output(), 4000))
			}
		}
	})
	for _, n := range names {
		if ev := env.Result(n, n+"-p", time.Minute); ev.Type != api.TypePrepared {
			t.Fatalf("prepare %s: %+v", n, ev)
		}
		env.SendCmd(n, "start", n+"-s", api.Command{})
	}
	for _, n := range names {
		if ev := env.Result(n, n+"-s", time.Minute); ev.Type != api.TypeStarted {
			t.Fatalf("start %s: %+v", n, ev)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	var kills atomic.Int64
	faultsDone := make(chan struct{})
	go func() {
		defer close(faultsDone)
		for i := 0; ctx.Err() == nil; i++ {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Duration(600+rand.IntN(1400)) * time.Millisecond):
			}
			switch i % 3 {
			case 0:
				c.killWorker("h1", 0)
			case 1:
				c.killWorker("h2", 0)
			case 2:
				c.killEngine("e1")
			}
			kills.Add(1)
		}
	}()
	var wg sync.WaitGroup
	var migrated, failed atomic.Int64
	for _, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				id := fmt.Sprintf("%s-mg%d", n, r)
				env.SendCmd(n, "migrate", id, api.Command{})
				ev := env.Result(n, id, 3*time.Minute)
				switch ev.Type {
				case api.TypeMigrated:
					migrated.Add(1)
				case api.TypeFailed:
					failed.Add(1)
				default:
					t.Errorf("migrate %s %s: %s %q", n, id, ev.Type, ev.Reason)
				}
			}
		}()
	}
	wg.Wait()
	cancel()
	<-faultsDone
	// Once the last processes are up again, each vm is where its record says.
	for _, n := range names {
		rec := record(t, env, n)
		if rec.State != api.StateRunning || rec.Migration != nil {
			t.Errorf("%s: record state %s migration %+v, want running", n, rec.State, rec.Migration)
			continue
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			cp := c.noopCopies(n)
			if len(cp) == 1 && cp[rec.Host] == string(api.StateRunning) {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s: the record says running on %s; the hosts hold %v", n, rec.Host, cp)
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	counts := env.CheckStreams()
	if counts.Duplicates != 0 || counts.Lost != 0 {
		t.Errorf("invariants broken: %s", counts)
	}
	fmt.Printf("FAULT-TEST TestMigrateFaults: kills=%d migrates=%d migrated=%d failed=%d twice=%d lost=%d; every vm held by exactly the host its record names\n",
		kills.Load(), vms*rounds, migrated.Load(), failed.Load(), counts.Duplicates, counts.Lost)
}

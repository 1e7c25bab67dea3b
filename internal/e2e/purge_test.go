package e2e_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/vmctl"
)

// completions asks vmctl's shell completion for VM names: what a shell
// offers after `vmctl <command> ` (status: the VMs not destroyed; purge:
// the destroyed ones).
func completions(t *testing.T, run func(args ...string) (string, string, int), command string) []string {
	t.Helper()
	out, errOut, code := run("__complete", command, "")
	if code != 0 {
		t.Fatalf("completion: exit %d\n%s%s", code, out, errOut)
	}
	var names []string
	for _, l := range strings.Split(out, "\n") {
		if l != "" && !strings.HasPrefix(l, ":") && !strings.HasPrefix(l, "Completion") {
			names = append(names, l)
		}
	}
	return names
}

// vmEventTypes lists the types of the VM's stored events.
func vmEventTypes(env *testenv.Env, name string) []string {
	var out []string
	for _, s := range env.Events(name) {
		if s.Event != nil {
			out = append(out, string(s.Event.Type)+"/"+string(s.Event.Action))
		}
	}
	return out
}

// Purge by hand: a destroyed VM leaves list --all, completion and
// VM_EVENTS (but its purge decision, which the per-VM concurrency check
// goes on from); a running VM is not purged (exit 1, the reason); the
// name is then created afresh and the new VM works; the other VMs are
// untouched; purge --all-destroyed --older-than picks by age.
func TestPurge(t *testing.T) {
	env, _, _ := setup(t)
	run := vmctlRunner(t, env)
	must := func(args ...string) string {
		t.Helper()
		out, errOut, code := run(args...)
		if code != 0 {
			t.Fatalf("vmctl %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
		}
		return out
	}
	must("create", "gone", "--backend", "noop", "--memory", "128", "--start", "--label", "job=1")
	must("create", "keep", "--backend", "noop", "--memory", "128", "--start")
	must("destroy", "gone")
	keepEvents := len(env.Events("keep"))

	listAll := func() []string {
		t.Helper()
		out := must("list", "--all")
		var names []string
		for _, l := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
			names = append(names, strings.Fields(l)[0])
		}
		return names
	}
	if got := listAll(); !slices.Equal(got, []string{"gone", "keep"}) {
		t.Fatalf("list --all before the purge: %v", got)
	}
	if got := completions(t, run, "status"); !slices.Equal(got, []string{"keep"}) {
		t.Fatalf("status completion before the purge: %v", got)
	}
	if got := completions(t, run, "purge"); !slices.Equal(got, []string{"gone"}) {
		t.Fatalf("purge completion before the purge: %v", got)
	}

	// A running VM: rejected, with the reason, exit 1; nothing changes.
	out, errOut, code := run("purge", "keep")
	if code != vmctl.ExitFailed || !strings.Contains(errOut, "purge keep rejected: cannot purge: vm is running; purge is allowed from destroyed") {
		t.Fatalf("purge of a running VM: exit %d\n%s%s", code, out, errOut)
	}
	if r := record(t, env, "keep"); r == nil || r.State != api.StateRunning {
		t.Fatalf("keep after a rejected purge: %+v", r)
	}
	// --json: one document, the rejection in it.
	out, _, code = run("--json", "purge", "keep")
	var doc struct {
		VMs []struct {
			VM    string `json:"vm"`
			Error *struct {
				Kind   string `json:"kind"`
				Reason string `json:"reason"`
			} `json:"error"`
		} `json:"vms"`
	}
	dec := json.NewDecoder(strings.NewReader(out))
	if err := dec.Decode(&doc); err != nil || dec.More() || code != vmctl.ExitFailed || len(doc.VMs) != 1 || doc.VMs[0].Error == nil ||
		doc.VMs[0].Error.Kind != "rejected" || !strings.Contains(doc.VMs[0].Error.Reason, "purge is allowed from destroyed") {
		t.Fatalf("--json purge of a running VM: exit %d, %v\n%s", code, err, out)
	}
	// A name with no VM: rejected too.
	if out, errOut, code := run("purge", "never"); code != vmctl.ExitFailed || !strings.Contains(errOut, "no VM named never") {
		t.Fatalf("purge of no VM: exit %d\n%s%s", code, out, errOut)
	}

	out = must("purge", "gone")
	if !strings.Contains(out, "purge gone: purged") {
		t.Fatalf("purge gone: %s", out)
	}
	// vmctl returned once the record left the bucket.
	if r := record(t, env, "gone"); r != nil {
		t.Fatalf("gone's record after the purge: %+v", r)
	}
	if got := listAll(); !slices.Equal(got, []string{"keep"}) {
		t.Fatalf("list --all after the purge: %v", got)
	}
	if got := completions(t, run, "status"); !slices.Equal(got, []string{"keep"}) {
		t.Fatalf("status completion after the purge: %v", got)
	}
	if got := completions(t, run, "purge"); len(got) != 0 {
		t.Fatalf("purge completion after the purge: %v", got)
	}
	if got := vmEventTypes(env, "gone"); !slices.Equal(got, []string{"accepted/purge"}) {
		t.Fatalf("gone's events after the purge: %v (want only the purge's decision)", got)
	}
	if n := len(env.Events("keep")); n != keepEvents+2 { // + the two rejected purges
		t.Fatalf("keep's events: %d, want %d", n, keepEvents+2)
	}
	// A second purge: the name has no VM now.
	if _, errOut, code := run("purge", "gone"); code != vmctl.ExitFailed || !strings.Contains(errOut, "no VM named gone") {
		t.Fatalf("second purge: exit %d\n%s", code, errOut)
	}

	// The name again: a new VM, generation 1, that works.
	must("create", "gone", "--backend", "noop", "--memory", "128", "--start")
	r := record(t, env, "gone")
	if r == nil || r.State != api.StateRunning || r.Generation != 1 || r.Labels != nil {
		t.Fatalf("gone created again: %+v", r)
	}
	must("stop", "gone")
	must("destroy", "gone")

	// --all-destroyed --older-than: none is old enough yet; then all.
	if out := must("purge", "--all-destroyed", "--older-than", "1h"); !strings.Contains(out, "no destroyed VMs to purge") {
		t.Fatalf("purge --older-than 1h: %s", out)
	}
	must("destroy", "keep")
	out = must("purge", "--all-destroyed")
	if !strings.Contains(out, "purge gone: purged") || !strings.Contains(out, "purge keep: purged") {
		t.Fatalf("purge --all-destroyed: %s", out)
	}
	if got := listAll(); len(got) != 0 {
		t.Fatalf("list --all after purging all: %v", got)
	}
	// Usage errors.
	for _, args := range [][]string{{"purge"}, {"purge", "a", "--all-destroyed"}, {"purge", "a", "--older-than", "1h"}} {
		if _, _, code := run(args...); code != vmctl.ExitUsage {
			t.Errorf("vmctl %q: exit %d, want %d", args, code, vmctl.ExitUsage)
		}
	}
	env.CheckProjection(wait)
}

// The engines' retention purges a VM destroyed longer ago than
// --retain-destroyed, and only such a VM.
func TestRetainDestroyed(t *testing.T) {
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{RetainDestroyed: 2 * time.Second})
	env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(eng, "h1")
	for _, name := range []string{"old", "alive"} {
		env.Send(name, "prepare", prepareBody(name), name+"-p")
		if res := env.Result(name, name+"-p", wait); res.Type != api.TypePrepared {
			t.Fatalf("prepare %s: %s %s", name, res.Type, res.Reason)
		}
	}
	env.Send("old", "destroy", "", "old-d")
	if res := env.Result("old", "old-d", wait); res.Type != api.TypeDestroyed {
		t.Fatalf("destroy old: %s", res.Type)
	}
	destroyedAt := time.Now()
	env.WaitFor("the retention to purge old", 20*time.Second, func() bool { return record(t, env, "old") == nil })
	if since := time.Since(destroyedAt); since < 2*time.Second-100*time.Millisecond {
		t.Fatalf("old was purged %s after its destroy, before --retain-destroyed 2s", since)
	}
	evs := env.Events("old")
	if len(evs) != 1 || evs[0].Event.Action != fsm.ActPurge || evs[0].Event.Issuer != "" || !strings.HasPrefix(evs[0].Event.CommandID, "retain-") ||
		!strings.Contains(evs[0].Event.Reason, "--retain-destroyed 2s") {
		t.Fatalf("old's events after the retention: %d, first %+v", len(evs), evs[0].Event)
	}
	// Prepared VMs stay, however old.
	time.Sleep(3 * time.Second)
	if r := record(t, env, "alive"); r == nil || r.State != api.StatePrepared {
		t.Fatalf("alive after the retention ran: %+v", r)
	}
	// The name is free: a new VM of it is not purged while it lives.
	env.Send("old", "prepare", prepareBody("old"), "old-p2")
	if res := env.Result("old", "old-p2", wait); res.Type != api.TypePrepared {
		t.Fatalf("prepare old again: %s %s", res.Type, res.Reason)
	}
	if r := record(t, env, "old"); r == nil || r.Generation != 1 {
		t.Fatalf("old again: %+v", r)
	}
	c := env.CheckStreams()
	if c.Lost != 0 || c.Duplicates != 0 {
		t.Fatalf("streams: %s", c)
	}
	env.CheckProjection(wait)
}

// A create racing a purge of the same name, across two engines, is
// never lost: whichever is decided first, the create ends accepted and
// its VM's record stays (a purge decided after it is rejected, one
// decided before it leaves the name free for it), and the records equal
// a rebuild.
func TestPurgeRacesCreate(t *testing.T) {
	env := testenv.New(t)
	e1 := env.StartEngine(testenv.EngineConfig{ID: "e1"})
	env.StartEngine(testenv.EngineConfig{ID: "e2"})
	env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(e1, "h1")
	const vms = 18
	for i := range vms {
		name := fmt.Sprintf("race%d", i)
		env.Send(name, "prepare", prepareBody(name), name+"-p1")
	}
	for i := range vms {
		name := fmt.Sprintf("race%d", i)
		if res := env.Result(name, name+"-p1", wait); res.Type != api.TypePrepared {
			t.Fatalf("prepare %s: %s %s", name, res.Type, res.Reason)
		}
		env.Send(name, "destroy", "", name+"-d1")
	}
	for i := range vms {
		name := fmt.Sprintf("race%d", i)
		if res := env.Result(name, name+"-d1", wait); res.Type != api.TypeDestroyed {
			t.Fatalf("destroy %s: %s %s", name, res.Type, res.Reason)
		}
	}
	env.WaitFor("the destroyed records", wait, func() bool {
		for i := range vms {
			if r := record(t, env, fmt.Sprintf("race%d", i)); r == nil || r.State != api.StateDestroyed {
				return false
			}
		}
		return true
	})
	// Purge and create of each name at once: a third of the names purge
	// first, a third create first, a third both at the same moment (two
	// publishers); two engines decide them.
	var wg sync.WaitGroup
	for i := range vms {
		name := fmt.Sprintf("race%d", i)
		purge := func() { env.Send(name, "purge", "", name+"-purge") }
		create := func() { env.Send(name, "prepare", prepareBody(name), name+"-p2") }
		switch i % 3 {
		case 0:
			wg.Add(1)
			go func() { defer wg.Done(); purge(); create() }()
		case 1:
			wg.Add(1)
			go func() { defer wg.Done(); create(); purge() }()
		default:
			wg.Add(2)
			go func() { defer wg.Done(); purge() }()
			go func() { defer wg.Done(); create() }()
		}
	}
	wg.Wait()
	purged, rejected := 0, 0
	for i := range vms {
		name := fmt.Sprintf("race%d", i)
		if res := env.Result(name, name+"-p2", wait); res.Type != api.TypePrepared {
			t.Fatalf("%s: the create racing a purge ended %s %s%s", name, res.Type, res.Reason, res.Error)
		}
		switch d := env.Decision(name, name+"-purge", wait); d.Type {
		case api.TypeAccepted:
			purged++
		case api.TypeRejected:
			rejected++
			if !strings.Contains(d.Reason, "cannot purge: vm is prepar") {
				t.Errorf("%s: purge rejected for %q", name, d.Reason)
			}
		}
	}
	t.Logf("purges decided before their create: %d, after (rejected): %d", purged, rejected)
	env.WaitFor("every record prepared", wait, func() bool {
		for i := range vms {
			r := record(t, env, fmt.Sprintf("race%d", i))
			if r == nil || r.State != api.StatePrepared {
				return false
			}
		}
		return true
	})
	c := env.CheckStreams()
	if c.Lost != 0 || c.Duplicates != 0 {
		t.Fatalf("streams: %s", c)
	}
	env.CheckProjection(wait)
	// And they still work.
	for i := range vms {
		name := fmt.Sprintf("race%d", i)
		env.Send(name, "start", "", name+"-s")
		if res := env.Result(name, name+"-s", wait); res.Type != api.TypeStarted {
			t.Fatalf("start %s after the race: %s %s", name, res.Type, res.Reason)
		}
	}
}

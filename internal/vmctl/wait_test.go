package vmctl

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/testenv"
)

// lifecycleDoc is a lifecycle command's --json document, as a script
// reads it.
type lifecycleDoc struct {
	VM       string `json:"vm"`
	Commands []struct {
		Action    string `json:"action"`
		CommandID string `json:"command_id"`
		Result    string `json:"result"`
		Skipped   string `json:"skipped"`
	} `json:"commands"`
	Record *struct {
		State string `json:"state"`
	} `json:"record"`
	Error *struct {
		Kind     string `json:"kind"`
		ExitCode int    `json:"exit_code"`
	} `json:"error"`
}

// vmctl wait: each --for, its JSON document, its exits (0 held, 1 cannot
// hold, 2 bad --for, 3 timed out, saying where the wait had got to), and
// a line on stderr when no engine takes commands any more; restart and
// the idempotent options as a script uses them.
func TestWaitRestartAndIdempotentOptions(t *testing.T) {
	t.Parallel()
	env, eng := pipeline(t, nil)
	ctx := context.Background()
	run := func(args ...string) result { return vmctl(t, ctx, env.URL, args...) }
	doc := func(r result) lifecycleDoc {
		t.Helper()
		var d lifecycleDoc
		strictJSON(t, r.out, &d)
		return d
	}

	if r := run("create", "a", "--backend", "noop"); r.code != 0 {
		t.Fatalf("create: %v", r)
	}
	var w struct {
		VM     string `json:"vm"`
		For    string `json:"for"`
		Record *struct {
			State string `json:"state"`
		} `json:"record"`
		Command *struct {
			Result string `json:"result"`
		} `json:"command"`
	}
	r := run("--json", "wait", "a", "--for", "state=prepared")
	if strictJSON(t, r.out, &w); r.code != 0 || w.VM != "a" || w.For != "state=prepared" || w.Record == nil || w.Record.State != "prepared" {
		t.Fatalf("wait --for state=prepared: %v", r)
	}

	// A command sent with --no-wait, waited for later by its id.
	r = run("--json", "start", "a", "--no-wait")
	d := doc(r)
	if r.code != 0 || len(d.Commands) != 1 || d.Commands[0].CommandID == "" || d.Commands[0].Result != "" {
		t.Fatalf("start --no-wait: %v", r)
	}
	w.Command = nil
	r = run("--json", "wait", "a", "--for", "command="+d.Commands[0].CommandID)
	if strictJSON(t, r.out, &w); r.code != 0 || w.Command == nil || w.Command.Result != "started" || w.Record == nil || w.Record.State != "running" {
		t.Fatalf("wait --for command=: %v", r)
	}

	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"wait", "a", "--for", "command=never-sent", "--timeout", "1s"}, ExitNoResult, "no decision of that command is stored"},
		{[]string{"wait", "a", "--for", "state=stopped", "--timeout", "1s"}, ExitNoResult, "not state=stopped within --timeout 1s: it is running"},
		{[]string{"wait", "ghost", "--for", "state=running"}, ExitFailed, "does not exist"},
		{[]string{"wait", "a", "--for", "state=asleep"}, ExitUsage, "not a state"},
		{[]string{"wait", "a", "--for", "banner"}, ExitUsage, "want state=STATE, ssh or command=ID"},
	} {
		if r := run(c.args...); r.code != c.code || !strings.Contains(r.err, c.want) {
			t.Errorf("%v: %v\nwant exit %d and %q", c.args, r, c.code, c.want)
		}
	}

	// restart: a stop and a start, one document.
	r = run("--json", "restart", "a")
	if d = doc(r); r.code != 0 || len(d.Commands) != 2 || d.Commands[0].Action != "stop" || d.Commands[0].Result != "stopped" ||
		d.Commands[1].Action != "start" || d.Commands[1].Result != "started" || d.Record == nil || d.Record.State != "running" {
		t.Fatalf("restart: %v", r)
	}

	// The idempotent options: success with the step listed as skipped;
	// without them, the clear rejection.
	for _, c := range []struct {
		args    []string
		skipped string
	}{
		{[]string{"create", "a", "--backend", "noop", "--if-not-exists"}, "already exists"},
		{[]string{"start", "a", "--if-needed"}, "running"},
		{[]string{"resume", "a", "--if-needed"}, "running"},
		{[]string{"destroy", "ghost", "--if-exists"}, "no such VM"},
	} {
		r := run(append([]string{"--json"}, c.args...)...)
		if d := doc(r); r.code != 0 || len(d.Commands) != 1 || !strings.Contains(d.Commands[0].Skipped, c.skipped) {
			t.Errorf("%v: %v\nwant exit 0 and a step skipped as %q", c.args, r, c.skipped)
		}
	}
	r = run("create", "a", "--backend", "noop")
	if r.code != ExitFailed || !strings.Contains(r.err, "a VM named a already exists (state running)") {
		t.Errorf("create of an existing name: %v", r)
	}
	r = run("--json", "start", "a")
	if d = doc(r); r.code != ExitFailed || d.Error == nil || d.Error.ExitCode != ExitFailed {
		t.Errorf("start of a running VM: %v", r)
	}

	// A VM without a network never answers SSH: said at once.
	if r := run("create", "n", "--backend", "noop", "--network", "none", "--start"); r.code != 0 {
		t.Fatalf("create n: %v", r)
	}
	if r := run("wait", "n", "--for", "ssh", "--timeout", "30s"); r.code != ExitFailed || !strings.Contains(r.err, "has no network") || r.took > 10*time.Second {
		t.Errorf("wait --for ssh of a VM without a network: %v", r)
	}

	// No engine any more: the wait says so on its own line, then times out.
	if err := eng.Stop(); err != nil {
		t.Fatal(err)
	}
	r = run("wait", "a", "--for", "state=stopped", "--timeout", "6s", "--progress", "always")
	if r.code != ExitNoResult || !strings.Contains(r.err, "vmctl: wait a: still waiting for state stopped: ") || !strings.Contains(r.err, "engine") {
		t.Errorf("wait with no engine: %v", r)
	}
}

// A spec that breaks a rule exits 2 (bad arguments) with one message,
// whether vmctl finds it (--backend qemu without an image) or the engine
// does with the host's defaults filled in (its default backend is qemu).
func TestSpecRuleExitsTwoEitherWay(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Default: api.BackendQEMU,
		Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: noop.New(noop.Options{})}})
	env.WaitHost(eng, "h1")
	ctx := context.Background()
	const want = "--image: is required for the qemu backend (a base image's path on the host, or the name of an image in the hosts' stores: vmctl image pull)"
	for _, args := range [][]string{
		{"create", "x1", "--backend", "qemu"},
		{"create", "x2"},
	} {
		r := vmctl(t, ctx, env.URL, args...)
		if r.code != ExitUsage || !strings.Contains(r.err, want) || strings.Count(r.err, "--image") != 1 {
			t.Errorf("%v: %v\nwant exit 2 and %q once", args, r, want)
		}
		r = vmctl(t, ctx, env.URL, append([]string{"--json"}, args...)...)
		var d lifecycleDoc
		if strictJSON(t, r.out, &d); r.code != ExitUsage || d.Error == nil || d.Error.ExitCode != ExitUsage {
			t.Errorf("--json %v: %v", args, r)
		}
	}
}

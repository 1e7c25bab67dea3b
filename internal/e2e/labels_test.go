package e2e_test

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
	"github.com/vmherd/vmherd/internal/vmctl"
)

// vmctlRunner runs vmctl in-process against env; it returns stdout,
// stderr and the exit code.
func vmctlRunner(t *testing.T, env *testenv.Env) func(args ...string) (string, string, int) {
	t.Helper()
	return func(args ...string) (string, string, int) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		var out, errOut syncbuf.Buffer
		code := vmctl.Run(ctx, append([]string{"--server", env.URL}, args...), &out, &errOut)
		return out.String(), errOut.String(), code
	}
}

// Labels set at create are in the record, shown by list and status, and
// filter list (every --label must match); a bad label is refused before
// anything is sent.
func TestLabels(t *testing.T) {
	env, _, _ := setup(t)
	run := vmctlRunner(t, env)
	for _, c := range []struct {
		name   string
		labels []string
	}{
		{"ci1", []string{"team=ci", "job=17"}},
		{"ci2", []string{"team=ci", "job=18", "ci.example.com/runner=big"}},
		{"web1", []string{"team=web"}},
		{"bare", nil},
	} {
		args := []string{"create", c.name, "--backend", "noop", "--memory", "128"}
		for _, l := range c.labels {
			args = append(args, "--label", l)
		}
		if out, errOut, code := run(args...); code != 0 {
			t.Fatalf("create %s: exit %d\n%s%s", c.name, code, out, errOut)
		}
	}
	if r := record(t, env, "ci2"); len(r.Labels) != 3 || r.Labels["ci.example.com/runner"] != "big" || r.Labels["job"] != "18" {
		t.Fatalf("ci2's record labels: %v", r.Labels)
	}
	if r := record(t, env, "bare"); r.Labels != nil {
		t.Fatalf("bare's record labels: %v", r.Labels)
	}

	names := func(args ...string) []string {
		t.Helper()
		out, errOut, code := run(append([]string{"--json", "list"}, args...)...)
		if code != 0 {
			t.Fatalf("list %q: exit %d\n%s%s", args, code, out, errOut)
		}
		var list []struct {
			Name   string            `json:"name"`
			Labels map[string]string `json:"labels"`
		}
		if err := json.Unmarshal([]byte(out), &list); err != nil {
			t.Fatalf("list --json: %v\n%s", err, out)
		}
		var got []string
		for _, v := range list {
			got = append(got, v.Name)
			if v.Name == "ci1" && (v.Labels["team"] != "ci" || v.Labels["job"] != "17") {
				t.Errorf("list --json: ci1's labels %v", v.Labels)
			}
		}
		return got
	}
	for _, c := range []struct {
		sel  []string
		want []string
	}{
		{nil, []string{"bare", "ci1", "ci2", "web1"}},
		{[]string{"--label", "team=ci"}, []string{"ci1", "ci2"}},
		{[]string{"--label", "team=ci", "--label", "job=18"}, []string{"ci2"}},
		{[]string{"--label", "team=web", "--label", "job=18"}, nil},
		{[]string{"--label", "ci.example.com/runner"}, []string{"ci2"}},
		{[]string{"--label", "job"}, []string{"ci1", "ci2"}},
		{[]string{"--label", "team=nobody"}, nil},
	} {
		if got := names(c.sel...); !slices.Equal(got, c.want) {
			t.Errorf("list %q: %v, want %v", c.sel, got, c.want)
		}
	}

	out, _, code := run("list", "--label", "team=ci")
	if code != 0 || !strings.Contains(out, "LABELS") || !strings.Contains(out, "job=17,team=ci") || strings.Contains(out, "web1") {
		t.Fatalf("list --label team=ci: exit %d\n%s", code, out)
	}
	out, _, code = run("status", "ci2")
	if code != 0 || !strings.Contains(out, "labels:") || !strings.Contains(out, "ci.example.com/runner=big,job=18,team=ci") {
		t.Fatalf("status ci2: exit %d\n%s", code, out)
	}

	// Destroyed VMs keep their labels: list --all --label finds them.
	if out, errOut, code := run("destroy", "ci1"); code != 0 {
		t.Fatalf("destroy ci1: exit %d\n%s%s", code, out, errOut)
	}
	if got := names("--label", "team=ci"); !slices.Equal(got, []string{"ci2"}) {
		t.Errorf("list --label team=ci after destroying ci1: %v", got)
	}
	if got := names("--all", "--label", "team=ci"); !slices.Equal(got, []string{"ci1", "ci2"}) {
		t.Errorf("list --all --label team=ci: %v", got)
	}

	// Refused locally (exit 2), naming the label and the rule; nothing is
	// sent, so no VM bad exists afterwards.
	for _, c := range []struct {
		label, want string
	}{
		{"-x=1", `key "-x" must match`},
		{"team", "give KEY=VALUE"},
		{"team=" + strings.Repeat("v", 64), "64 characters is too long"},
		{"team=a\tb", "control characters"},
	} {
		out, errOut, code := run("create", "bad", "--backend", "noop", "--label", c.label)
		if code != vmctl.ExitUsage || !strings.Contains(errOut, c.want) {
			t.Errorf("create --label %q: exit %d, want %d with %q\n%s%s", c.label, code, vmctl.ExitUsage, c.want, out, errOut)
		}
	}
	if r := record(t, env, "bad"); r != nil {
		t.Fatalf("a refused create left a record: %+v", r)
	}
	// The engine checks them too: a command published by hand with a bad
	// label is rejected, naming it.
	env.Send("bad", "prepare", `{"spec":{"backend":"noop","labels":{"team":"a\nb"}}}`, "bad-1")
	if ev := env.Decision("bad", "bad-1", wait); ev.Type != "rejected" || !strings.Contains(ev.Reason, "spec.labels.team") {
		t.Fatalf("a prepare with a bad label: %s %q", ev.Type, ev.Reason)
	}
	env.CheckProjection(wait)
}

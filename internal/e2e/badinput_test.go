package e2e_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmherd/vmherd/api"
)

type badCase struct {
	Case     string `json:"case"`
	VM       string `json:"vm"`
	Action   string `json:"action"`
	Body     string `json:"body"`
	BodyFill *struct {
		Prefix, Fill, Suffix string
		Size                 int
	} `json:"body_fill"`
	Want           []string `json:"want"`
	InvalidSubject bool     `json:"invalid_subject"`
	Setup          string   `json:"setup"`
}

// The corpus in testdata/bad-commands.json: each malformed command yields
// exactly one rejected event whose reason names the field and the rule,
// the engine keeps serving, and the worker's data dir holds nothing new.
func TestBadInputCorpus(t *testing.T) {
	raw, err := os.ReadFile("testdata/bad-commands.json")
	if err != nil {
		t.Fatal(err)
	}
	var corpus []badCase
	if err := json.Unmarshal(raw, &corpus); err != nil {
		t.Fatal(err)
	}
	if len(corpus) < 30 {
		t.Fatalf("corpus has %d cases", len(corpus))
	}
	env, _, _ := setup(t)
	// A VM that existed and was destroyed, and one that is running.
	env.SendCmd("gone1", "prepare", "g1", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("gone1", "g1", wait)
	env.SendCmd("gone1", "destroy", "g2", api.Command{})
	env.Result("gone1", "g2", wait)
	env.SendCmd("bad1", "prepare", "b1", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("bad1", "b1", wait)
	before := listFiles(t, env.Dir)

	for i, c := range corpus {
		id := fmt.Sprintf("corpus-%02d", i)
		body := c.Body
		if f := c.BodyFill; f != nil {
			body = f.Prefix + strings.Repeat(f.Fill, f.Size) + f.Suffix
		}
		env.Send(c.VM, c.Action, body, id)
		subj := c.VM
		if c.InvalidSubject {
			subj = "_invalid"
		}
		ev := env.Decision(subj, id, wait)
		if ev.Type != api.TypeRejected {
			t.Errorf("%s: %s, want rejected", c.Case, ev.Type)
			continue
		}
		for _, w := range c.Want {
			if !strings.Contains(ev.Reason, w) {
				t.Errorf("%s: reason %q does not mention %q", c.Case, ev.Reason, w)
			}
		}
		n := 0
		for _, s := range env.Events(subj) {
			if s.Event != nil && s.Event.CommandID == id {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%s: %d events for the command, want exactly 1", c.Case, n)
		}
	}
	// Still serving.
	env.SendCmd("bad1", "start", "alive", api.Command{})
	if ev := env.Result("bad1", "alive", wait); ev.Type != api.TypeStarted {
		t.Fatalf("engine stopped serving after the corpus: %+v", ev)
	}
	// Nothing was written but the streams' own files.
	after := listFiles(t, env.Dir)
	for f := range after {
		if !before[f] && !strings.HasPrefix(f, "js/") {
			t.Errorf("bad input created %s", f)
		}
	}
}

func listFiles(t *testing.T, root string) map[string]bool {
	out := map[string]bool{}
	_ = filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err == nil {
			rel, _ := filepath.Rel(root, p)
			out[rel] = true
		}
		return nil
	})
	return out
}

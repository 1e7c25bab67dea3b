package vmctl

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/testenv"
)

// strictJSON decodes exactly one JSON document from s into v.
func strictJSON(t *testing.T, s string, v any) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(s))
	if err := dec.Decode(v); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, s)
	}
	if _, err := dec.Token(); err != io.EOF {
		t.Fatalf("more after the JSON document: %q", s)
	}
}

// TestListFiltersAndFormats: list's --state, --host and --all filters, and
// every --format (table with --columns, json, jsonl, yaml, name); the yaml
// and json documents hold the same fields; bad values exit 2 naming them.
func TestListFiltersAndFormats(t *testing.T) {
	t.Parallel()
	env, _ := pipeline(t, nil)
	ctx := context.Background()
	for _, args := range [][]string{
		{"create", "a", "--backend", "noop", "--start", "--label", "team=ci"},
		{"create", "b", "--backend", "noop"},
		{"create", "c", "--backend", "noop"},
		{"destroy", "c"},
	} {
		if r := vmctl(t, ctx, env.URL, args...); r.code != 0 {
			t.Fatalf("%v: %v", args, r)
		}
	}
	names := func(args ...string) string {
		t.Helper()
		r := vmctl(t, ctx, env.URL, append([]string{"list", "--format", "name"}, args...)...)
		if r.code != 0 {
			t.Fatalf("list %v: %v", args, r)
		}
		return strings.Join(strings.Fields(r.out), " ")
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "a b"},
		{[]string{"--all"}, "a b c"},
		{[]string{"--state", "running"}, "a"},
		{[]string{"--state", "prepared,running"}, "a b"},
		{[]string{"--state", "prepared", "--state", "running"}, "a b"},
		{[]string{"--all", "--state", "destroyed"}, "c"},
		{[]string{"--host", "h1"}, "a b"},
		{[]string{"--host", "h9"}, ""},
		{[]string{"--host", "h1", "--state", "prepared"}, "b"},
		{[]string{"--label", "team=ci"}, "a"},
	} {
		if got := names(c.args...); got != c.want {
			t.Errorf("list %v = %q, want %q", c.args, got, c.want)
		}
	}

	r := vmctl(t, ctx, env.URL, "list", "--format", "json")
	var asJSON []map[string]any
	strictJSON(t, r.out, &asJSON)
	if len(asJSON) != 2 || asJSON[0]["name"] != "a" || asJSON[0]["state"] != "running" || asJSON[1]["state"] != "prepared" {
		t.Fatalf("list --format json: %s", r.out)
	}
	if r2 := vmctl(t, ctx, env.URL, "--json", "list"); r2.out != r.out {
		t.Errorf("--json list differs from --format json:\n%s\n%s", r2.out, r.out)
	}

	r = vmctl(t, ctx, env.URL, "list", "--format", "jsonl")
	lines := strings.Split(strings.TrimSpace(r.out), "\n")
	if r.code != 0 || len(lines) != 2 {
		t.Fatalf("list --format jsonl: %v", r)
	}
	for i, l := range lines {
		var m map[string]any
		strictJSON(t, l, &m)
		if !reflect.DeepEqual(m, asJSON[i]) {
			t.Errorf("jsonl line %d differs from the json document's element:\n%v\n%v", i, m, asJSON[i])
		}
	}

	r = vmctl(t, ctx, env.URL, "list", "--format", "yaml")
	var asYAML []map[string]any
	dec := yaml.NewDecoder(bytes.NewReader([]byte(r.out)))
	dec.KnownFields(true)
	if r.code != 0 || dec.Decode(&asYAML) != nil || len(asYAML) != 2 {
		t.Fatalf("list --format yaml: %v", r)
	}
	// The same document: YAML's integers and JSON's float64s compare by
	// going through JSON once more.
	b, _ := json.Marshal(asYAML)
	var again []map[string]any
	strictJSON(t, string(b), &again)
	if !reflect.DeepEqual(again, asJSON) {
		t.Errorf("yaml and json differ:\n%s\n%s", r.out, b)
	}
	if !strings.Contains(r.out, "generation: 1\n") {
		t.Errorf("yaml writes numbers as numbers: %s", r.out)
	}

	r = vmctl(t, ctx, env.URL, "list", "--columns", "name,state,labels")
	if f := strings.Fields(strings.Split(r.out, "\n")[0]); r.code != 0 || !reflect.DeepEqual(f, []string{"NAME", "STATE", "LABELS"}) ||
		!strings.Contains(r.out, "team=ci") {
		t.Fatalf("list --columns: %v", r)
	}

	for _, args := range [][]string{
		{"list", "--format", "xml"},
		{"list", "--state", "sleeping"},
		{"list", "--columns", "colour"},
	} {
		r := vmctl(t, ctx, env.URL, args...)
		if r.code != ExitUsage || !strings.Contains(r.err, `"`+args[2]+`"`) {
			t.Errorf("%v: %v", args, r)
		}
	}
}

func TestPrintable(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:40022 (on host h1)":  "127.0.0.1:40022 (on host h1)",
		"unix:/var/lib/vmherd/vnc.sock": "unix:/var/lib/vmherd/vnc.sock",
		"zoë":                           "zoë",
		"\x1b[2Jcleared":                `"\x1b[2Jcleared"`,
		"a\nb":                          `"a\nb"`,
		"\u202egnp.exe":                 `"\u202egnp.exe"`,
	} {
		if got := printable(in); got != want {
			t.Errorf("printable(%q) = %s, want %s", in, got, want)
		}
	}
}

// addressed is a Noop backend under the qemu tag whose guests have an
// address, as a QEMU guest with user networking has.
type addressed struct{ *noop.Backend }

func (a addressed) Prepare(ctx context.Context, spec api.VmSpec) (api.VmHandle, error) {
	h, err := a.Backend.Prepare(ctx, spec)
	h.Backend = api.BackendQEMU
	return h, err
}

func (a addressed) Start(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	h, err := a.Backend.Start(ctx, h)
	h.Backend = api.BackendQEMU
	return h, err
}

func (addressed) GuestIP(context.Context, api.VmHandle) (string, error) {
	return "127.0.0.1:40022", nil
}

// list asks the workers for running VMs' addresses: the table's IP
// column and the json document's ip (none for a VM that does not run).
func TestListShowsTheGuestAddress(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	images := t.TempDir()
	base := filepath.Join(images, "base.img")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Default: api.BackendQEMU, ImageRoots: []string{images},
		Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: addressed{noop.New(noop.Options{})}}})
	env.WaitHost(eng, "h1")
	ctx := context.Background()
	if r := vmctl(t, ctx, env.URL, "create", "q", "--image", base, "--start"); r.code != 0 {
		t.Fatalf("create: %v", r)
	}
	if r := vmctl(t, ctx, env.URL, "create", "p", "--image", base); r.code != 0 {
		t.Fatalf("create: %v", r)
	}
	r := vmctl(t, ctx, env.URL, "--json", "list")
	var l []map[string]any
	strictJSON(t, r.out, &l)
	if r.code != 0 || len(l) != 2 || l[0]["name"] != "p" || l[0]["ip"] != nil || l[1]["name"] != "q" || l[1]["ip"] != "127.0.0.1:40022" {
		t.Fatalf("list --json: %v", r)
	}
	r = vmctl(t, ctx, env.URL, "list", "--columns", "name,ip")
	if !strings.Contains(r.out, "127.0.0.1:40022") {
		t.Fatalf("list --columns name,ip: %v", r)
	}
}

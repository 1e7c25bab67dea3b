package vmctl

import (
	"context"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"
)

// vmctl up with a VMFile from someone else's repository: a user-data file
// outside the VMFile's directory (here the admin's credentials) is refused
// before anything is sent, so the secret never reaches the events; the
// user can widen the rule only on the command line (issue #26.3).
func TestUpConfinesVMFilePaths(t *testing.T) {
	t.Parallel()
	env, _ := pipeline(t, nil)
	ctx := context.Background()
	root := t.TempDir()
	repo := filepath.Join(root, "repo")
	creds := filepath.Join(root, "data", "auth", "admin.creds")
	for p, content := range map[string]string{
		creds:                             "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ\n------END NATS USER JWT------\n",
		filepath.Join(repo, "VMFile.kdl"): "vm \"leak1\" {\n backend \"noop\"\n cloud-init {\n  user-data \"../data/auth/admin.creds\"\n }\n}\n",
	} {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	file := filepath.Join(repo, "VMFile.kdl")
	r := vmctl(t, ctx, env.URL, "up", "--file", file)
	if r.code != ExitUsage || !strings.Contains(r.err, "cloud-init user-data "+creds) || !strings.Contains(r.err, "--allow-path") {
		t.Fatalf("up with user-data outside the VMFile's directory: %v", r)
	}
	// Allowing the directory is not enough for a file that looks secret.
	r = vmctl(t, ctx, env.URL, "up", "--file", file, "--allow-path", filepath.Dir(creds))
	if r.code != ExitUsage || !strings.Contains(r.err, "looks like a secret (it holds NATS user credentials)") || !strings.Contains(r.err, "--allow-secret "+creds) {
		t.Fatalf("up with secret user-data in an allowed directory: %v", r)
	}
	if n := len(env.Events("leak1")); n != 0 {
		t.Fatalf("%d events stored for leak1 after refusals", n)
	}
	// The user says both: it goes.
	r = vmctl(t, ctx, env.URL, "up", "--file", file, "--allow-path", filepath.Dir(creds), "--allow-secret", creds)
	if r.code != 0 {
		t.Fatalf("up with --allow-path and --allow-secret: %v", r)
	}
}

// A plain destroy (not down --destroy, not a forget) deletes the VM's
// generated key, host keys and provisioning log from VM_SSH, and the next
// vmctl up of the name logs in with a new key (issue #26.4).
func TestDestroyDeletesSSHEntries(t *testing.T) {
	t.Parallel()
	env, _ := pipeline(t, nil)
	ctx := context.Background()
	dir := t.TempDir()
	file := filepath.Join(dir, "VMFile.kdl")
	if err := os.WriteFile(file, []byte("vm \"keyed\" {\n backend \"noop\"\n ssh {\n  user \"vm\"\n }\n}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	kv, err := env.JS.KeyValue(ctx, env.Names.SSHBucket())
	if err != nil {
		t.Fatal(err)
	}
	entries := func() map[string]string {
		out := map[string]string{}
		lister, err := kv.ListKeysFiltered(ctx, "keyed.>")
		if err != nil {
			t.Fatal(err)
		}
		for k := range lister.Keys() {
			if e, err := kv.Get(ctx, k); err == nil {
				out[k] = string(e.Value())
			}
		}
		return out
	}
	pubKey := func() string {
		t.Helper()
		spec, err := (&globals{js: env.JS, names: env.Names}).acceptedSpec(ctx, "keyed")
		if err != nil || spec == nil || spec.SSH == nil {
			t.Fatalf("keyed's accepted spec: %+v %v", spec, err)
		}
		return spec.SSH.PublicKey
	}
	if r := vmctl(t, ctx, env.URL, "up", "--file", file); r.code != 0 {
		t.Fatalf("up: %v", r)
	}
	first := entries()
	if len(first) != 1 {
		t.Fatalf("VM_SSH after up: %v", first)
	}
	pub1 := pubKey()
	// What provisioning would have kept for this incarnation.
	for k := range first {
		base := strings.TrimSuffix(k, ".key")
		for _, w := range []string{"hostkeys", "provision"} {
			if _, err := kv.Put(ctx, base+"."+w, []byte("x")); err != nil {
				t.Fatal(err)
			}
		}
	}
	if r := vmctl(t, ctx, env.URL, "destroy", "keyed"); r.code != 0 {
		t.Fatalf("destroy: %v", r)
	}
	env.WaitFor("VM_SSH emptied of the destroyed VM's entries", 10*time.Second, func() bool { return len(entries()) == 0 })
	if r := vmctl(t, ctx, env.URL, "up", "--file", file); r.code != 0 {
		t.Fatalf("up again: %v", r)
	}
	second := entries()
	if len(second) != 1 {
		t.Fatalf("VM_SSH after the second up: %v", second)
	}
	for k, v := range second {
		if first[k] == v || slices.Contains(slices.Collect(maps.Values(first)), v) {
			t.Fatalf("the new incarnation reuses the old key (%s)", k)
		}
	}
	if pub2 := pubKey(); pub2 == pub1 {
		t.Fatalf("the new incarnation authorizes the old public key %s", pub1)
	}
}

// The same command id for two VMs: VM_COMMANDS deduplicates Nats-Msg-Id
// across every VM, so vmctl sends <vm>/<command id> and both commands are
// decided (alice's deploy-42 for d2 is not dropped as a duplicate of bob's
// for d1; issue #26.9).
func TestCommandIDsArePerVM(t *testing.T) {
	t.Parallel()
	env, _ := pipeline(t, nil)
	ctx := context.Background()
	var out, errOut strings.Builder
	c, err := client.New(env.NC, env.Names.Prefix, "")
	if err != nil {
		t.Fatal(err)
	}
	g := &globals{c: c, nc: env.NC, js: env.JS, names: env.Names, out: &out, errOut: &errOut, timeout: 20 * time.Second}
	for _, name := range []string{"d1", "d2"} {
		ev, err := g.send(ctx, name, "prepare", api.Command{CommandID: "deploy-42", Spec: &api.VmSpec{Backend: api.BackendNoop}})
		if err != nil || ev == nil || ev.Type != api.TypePrepared {
			t.Fatalf("prepare %s with command id deploy-42: %+v, %v\n%s%s", name, ev, err, out.String(), errOut.String())
		}
	}
	st, err := env.JS.Stream(ctx, env.Names.CommandsStream())
	if err != nil {
		t.Fatal(err)
	}
	m, err := st.GetLastMsgForSubject(ctx, env.Names.Command("d2", "prepare"))
	if err != nil {
		t.Fatal(err)
	}
	if id := m.Header.Get("Nats-Msg-Id"); id != "d2/deploy-42" {
		t.Fatalf("d2's command has Nats-Msg-Id %q, want d2/deploy-42", id)
	}
}

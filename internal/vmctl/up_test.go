package vmctl

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
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

package vmfile_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/nkeys"

	"github.com/vmherd/vmherd/internal/vmfile"
)

// A VMFile reaches only files under its own directory (symlinks, .. and
// ~ resolved), and never puts a secret-looking file into a spec or a
// guest, unless the user widens that on the command line (issue #26.3).
func TestCheckConfinesPaths(t *testing.T) {
	root := t.TempDir()
	home := filepath.Join(root, "home")
	repo := filepath.Join(root, "repo")
	data := filepath.Join(root, "data")
	t.Setenv("HOME", home)
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := kp.Seed()
	files := map[string]string{
		"home/.ssh/id_rsa":        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n",
		"home/.ssh/id_rsa.pub":    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@x\n",
		"data/auth/admin.creds":   "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ\n------END NATS USER JWT------\n",
		"data/notes.txt":          "hello\n",
		"repo/user-data.yaml":     "#cloud-config\n",
		"repo/app.conf":           "listen 8080\n",
		"repo/keys/id_ed25519":    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n",
		"repo/tls.key":            "junk\n-----BEGIN EC PRIVATE KEY-----\nMHcC\n-----END EC PRIVATE KEY-----\n",
		"repo/account.nk":         string(seed) + "\n",
		"repo/big.bin":            strings.Repeat("x", 300<<10) + "-----BEGIN RSA PRIVATE KEY-----\n",
		"repo/copied.creds":       "-----BEGIN NATS USER JWT-----\nxx\n",
		"repo/scripts/setup.sh":   "echo hi\n",
		"repo/seedlike-lower.txt": strings.ToLower(string(seed)) + "\n",
	}
	for rel, content := range files {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Join(data, "auth/admin.creds"), filepath.Join(repo, "innocent.yaml")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(data, filepath.Join(repo, "lib")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(repo, "adir"), 0o755); err != nil {
		t.Fatal(err)
	}
	vmf := func(body string) string {
		return "vm \"a\" {\n backend \"noop\"\n" + strings.ReplaceAll(body, "; ", "\n") + "\n}\n"
	}
	for _, c := range []struct {
		name   string
		body   string
		access vmfile.Access
		want   []string // in the error; none: accepted
	}{
		{"inside", `cloud-init { user-data "user-data.yaml"; }; provision "file" { source "app.conf"; destination "/etc/app.conf"; }; provision "shell" { script "scripts/setup.sh"; }`, vmfile.Access{}, nil},
		{"user-data through ..", `cloud-init { user-data "../data/auth/admin.creds"; }`, vmfile.Access{},
			[]string{`vm "a": cloud-init user-data ` + filepath.Join(data, "auth/admin.creds"), "path refused", "outside the directories a VMFile may read (" + repo + ")", "--allow-path " + filepath.Join(data, "auth")}},
		{"absolute path", `provision "file" { source "` + filepath.Join(data, "notes.txt") + `"; destination "/x"; }`, vmfile.Access{},
			[]string{`provision "file" source ` + filepath.Join(data, "notes.txt"), "outside the directories"}},
		{"~ is home, still confined", `provision "file" { source "~/.ssh/id_rsa"; destination "/root/k"; }`, vmfile.Access{},
			[]string{`provision "file" source ` + filepath.Join(home, ".ssh/id_rsa"), "outside the directories"}},
		{"ssh-key under ~", `cloud-init { ssh-key "~/.ssh/id_rsa.pub"; }`, vmfile.Access{}, []string{"cloud-init ssh-key", "outside"}},
		{"private-key under ~", `ssh { private-key "~/.ssh/id_rsa"; }`, vmfile.Access{}, []string{"ssh private-key", "outside"}},
		{"private-key allowed by --allow-path", `ssh { private-key "~/.ssh/id_rsa"; }; cloud-init { ssh-key "~/.ssh/id_rsa.pub"; }`, vmfile.Access{Allow: []string{filepath.Join(home, ".ssh")}}, nil},
		{"symlinked file", `cloud-init { user-data "innocent.yaml"; }`, vmfile.Access{},
			[]string{"user-data " + filepath.Join(repo, "innocent.yaml"), "it resolves to " + filepath.Join(data, "auth/admin.creds"), "outside"}},
		{"symlinked directory", `provision "file" { source "lib/notes.txt"; destination "/x"; }`, vmfile.Access{}, []string{"it resolves to " + filepath.Join(data, "notes.txt"), "outside"}},
		{"a directory", `provision "file" { source "adir"; destination "/x"; }`, vmfile.Access{}, []string{"not a regular file"}},
		{"missing", `provision "shell" { script "nope.sh"; }`, vmfile.Access{}, []string{`provision "shell" script ` + filepath.Join(repo, "nope.sh"), "no such file"}},
		{"allowed directory, still no secrets", `cloud-init { user-data "../data/auth/admin.creds"; }`, vmfile.Access{Allow: []string{data}},
			[]string{"looks like a secret (it holds NATS user credentials)", "the VM's spec", "--allow-secret " + filepath.Join(data, "auth/admin.creds")}},
		{"allowed directory", `provision "file" { source "../data/notes.txt"; destination "/x"; }`, vmfile.Access{Allow: []string{data}}, nil},
		{"private key into the guest", `provision "file" { source "keys/id_ed25519"; destination "/root/.ssh/id"; }`, vmfile.Access{},
			[]string{`provision "file" source`, "an OpenSSH private key", "copied into the guest"}},
		{"PEM key after other lines", `provision "file" { source "tls.key"; destination "/x"; }`, vmfile.Access{}, []string{"a PEM private key"}},
		{"nkey seed", `provision "shell" { script "account.nk"; }`, vmfile.Access{}, []string{"an nkey seed"}},
		{"key deep in a large file", `provision "file" { source "big.bin"; destination "/x"; }`, vmfile.Access{}, []string{"a PEM private key"}},
		{"creds as ssh-key", `cloud-init { ssh-key "copied.creds"; }`, vmfile.Access{}, []string{"NATS user credentials"}},
		{"secret allowed by --allow-secret", `provision "file" { source "keys/id_ed25519"; destination "/root/.ssh/id"; }`, vmfile.Access{Secrets: []string{filepath.Join(repo, "keys/id_ed25519")}}, nil},
		{"private-key is local only", `ssh { private-key "keys/id_ed25519"; }`, vmfile.Access{}, nil},
		{"lower-case look-alike", `provision "file" { source "seedlike-lower.txt"; destination "/x"; }`, vmfile.Access{}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, err := vmfile.ParseBytes([]byte(vmf(c.body)), filepath.Join(repo, "VMFile.kdl"))
			if err != nil {
				t.Fatal(err)
			}
			err = f.Check(c.access)
			if len(c.want) == 0 {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted: %+v", f.VMs[0])
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if !errors.Is(err, vmfile.ErrPathRefused) && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("error wraps neither ErrPathRefused nor ErrNotExist: %v", err)
			}
		})
	}
	// What passed the check is what is read: the resolved path.
	f, err := vmfile.ParseBytes([]byte(vmf(`provision "file" { source "lib/notes.txt"; destination "/x"; }`)), filepath.Join(repo, "VMFile.kdl"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Check(vmfile.Access{Allow: []string{data}}); err != nil {
		t.Fatal(err)
	}
	if got := f.VMs[0].Provision[0].Source; got != filepath.Join(data, "notes.txt") {
		t.Fatalf("source after Check: %s", got)
	}
}

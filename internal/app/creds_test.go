package app_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmherd/vmherd/internal/app"
)

// engine creds -o never writes through a symlink planted at the path and
// never keeps an existing file's mode (issue #26.7).
func TestEngineCredsOutputIsSafe(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	out := t.TempDir() // as if another user could write here
	creds := func(o string) int {
		return app.EngineMain([]string{"creds", "--data-dir", data, "--role", "viewer", "--name", "dash", "-o", o})
	}
	// A symlink planted where the credentials go: refused, target untouched.
	theirs := filepath.Join(out, "theirs")
	if err := os.WriteFile(theirs, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(out, "dash.creds")
	if err := os.Symlink(theirs, link); err != nil {
		t.Fatal(err)
	}
	if code := creds(link); code == 0 {
		t.Errorf("creds -o through a planted symlink succeeded")
	}
	if b, _ := os.ReadFile(theirs); len(b) != 0 {
		t.Fatalf("credentials were written to the symlink's target:\n%s", b)
	}
	// An existing 0666 file becomes a new 0600 file.
	loose := filepath.Join(out, "loose.creds")
	if err := os.WriteFile(loose, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(loose, 0o666); err != nil {
		t.Fatal(err)
	}
	if code := creds(loose); code != 0 {
		t.Fatalf("creds -o over an existing file: exit %d", code)
	}
	st, err := os.Stat(loose)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("%s after creds -o: %v %v, want 0600", loose, st.Mode(), err)
	}
	if b, _ := os.ReadFile(loose); !strings.Contains(string(b), "BEGIN NATS USER JWT") {
		t.Fatalf("%s holds %q", loose, b)
	}
	// The authority's own files are 0600 regular files too.
	ents, err := os.ReadDir(filepath.Join(data, "auth"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if info, err := e.Info(); err == nil && info.Mode().IsRegular() && info.Mode().Perm()&0o077 != 0 && filepath.Ext(e.Name()) != ".jwt" {
			t.Errorf("%s is %v", e.Name(), info.Mode())
		}
	}
}

package require

import (
	"os"
	"path/filepath"
	"testing"
)

// TestRepoRoot finds the checkout from inside it (a package directory, as
// under go test) and, through the source it was built from, from outside
// it; a go.mod of another module on the way up is not it.
func TestRepoRoot(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if !isRoot(root) {
		t.Fatalf("RepoRoot %s holds no go.mod of %s", root, Module)
	}
	if _, err := os.Stat(filepath.Join(root, "internal", "testenv", "require", "require.go")); err != nil {
		t.Fatalf("RepoRoot %s is not the checkout: %v", root, err)
	}

	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, "go.mod"), []byte("module example.com/other\n\ngo 1.26\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Chdir(other)
	got, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if got != root {
		t.Fatalf("from another module: RepoRoot = %s, want %s", got, root)
	}
}

func TestIsRoot(t *testing.T) {
	for body, want := range map[string]bool{
		"module github.com/vmherd/vmherd\n":           true,
		"// c\nmodule \"github.com/vmherd/vmherd\"\n": true,
		"module github.com/vmherd/vmherd/internal\n":  false,
		"modulegithub.com/vmherd/vmherd\n":            false,
		"go 1.26\n":                                   false,
	} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if got := isRoot(dir); got != want {
			t.Errorf("isRoot(%q) = %v, want %v", body, got, want)
		}
	}
	if isRoot(t.TempDir()) {
		t.Error("isRoot of a directory without go.mod")
	}
}

// TestRequireSkips: without VMHERD_REQUIRE_ALL a missing prerequisite
// skips the test (its failing half is what scripts/test exercises).
func TestRequireSkips(t *testing.T) {
	t.Setenv(AllEnv, "")
	ran := false
	var sub *testing.T
	t.Run("missing", func(t *testing.T) {
		sub = t
		Require(t, true, "present")
		ran = true
		Require(t, false, "absent")
		t.Error("Require returned for a missing prerequisite")
	})
	if !ran {
		t.Error("Require stopped on a present prerequisite")
	}
	if !sub.Skipped() {
		t.Error("a missing prerequisite did not skip")
	}
}

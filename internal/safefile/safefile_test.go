package safefile_test

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/vmherd/vmherd/internal/safefile"
)

func TestWrite(t *testing.T) {
	// A permissive umask must not widen the file.
	old := syscall.Umask(0)
	t.Cleanup(func() { syscall.Umask(old) })
	dir := t.TempDir()
	secret := []byte("-----BEGIN NATS USER JWT-----\n")

	// A new file: 0600 whatever the umask.
	p := filepath.Join(dir, "new.creds")
	if err := safefile.Write(p, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(p); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("new file: %v %v", st.Mode(), err)
	}

	// An existing world-writable file is replaced by a new 0600 one.
	loose := filepath.Join(dir, "loose.creds")
	if err := os.WriteFile(loose, []byte("old"), 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(loose, 0o666); err != nil {
		t.Fatal(err)
	}
	before, _ := os.Stat(loose)
	if err := safefile.Write(loose, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	after, _ := os.Stat(loose)
	if after.Mode().Perm() != 0o600 || os.SameFile(before, after) {
		t.Fatalf("an existing 0666 file: now %v (same inode: %v)", after.Mode(), os.SameFile(before, after))
	}
	if b, _ := os.ReadFile(loose); string(b) != string(secret) {
		t.Fatalf("content %q", b)
	}

	// A symlink planted at the destination is neither followed nor
	// replaced; its target stays as it was.
	target := filepath.Join(dir, "planted-target")
	if err := os.WriteFile(target, []byte("theirs"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.creds")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	dangling := filepath.Join(dir, "dangling.creds")
	if err := os.Symlink(filepath.Join(dir, "nowhere"), dangling); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{link, dangling} {
		err := safefile.Write(l, secret, 0o600)
		if !errors.Is(err, safefile.ErrNotRegular) {
			t.Fatalf("write through symlink %s: %v", l, err)
		}
	}
	if b, _ := os.ReadFile(target); string(b) != "theirs" {
		t.Fatalf("the symlink's target was written: %q", b)
	}
	if _, err := os.Lstat(filepath.Join(dir, "nowhere")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the dangling symlink's target was created: %v", err)
	}
	// A directory is refused too, and no temporary file is left behind.
	if err := safefile.Write(dir, secret, 0o600); !errors.Is(err, safefile.ErrNotRegular) {
		t.Fatalf("write over a directory: %v", err)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if filepath.Ext(e.Name()) == ".tmp" {
			t.Errorf("left behind: %s", e.Name())
		}
	}
}

package vmctl

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// vmctl ssh pins a guest's host key per incarnation in vmherd's own file:
// a VM made again under the same name gets a new alias, so ssh meets a
// new host instead of refusing a changed one; the user's known_hosts is
// never named.
func TestHostKeyArgs(t *testing.T) {
	state := t.TempDir()
	t.Setenv("XDG_STATE_HOME", state)
	pins, err := knownHostsFile()
	if err != nil {
		t.Fatal(err)
	}
	if pins != filepath.Join(state, "vmherd", "known_hosts") {
		t.Fatalf("known-hosts file %s", pins)
	}
	if st, err := os.Stat(filepath.Dir(pins)); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("its directory: %v %v", st, err)
	}
	first, again := hostKeyArgs("web1", "a1b2", "", pins), hostKeyArgs("web1", "c3d4", "", pins)
	for _, a := range [][]string{first, again} {
		if !slices.Contains(a, "UserKnownHostsFile="+pins) || !slices.Contains(a, "StrictHostKeyChecking=accept-new") {
			t.Fatalf("args %v", a)
		}
	}
	if !slices.Contains(first, "HostKeyAlias=vmherd-web1-a1b2") || !slices.Contains(again, "HostKeyAlias=vmherd-web1-c3d4") {
		t.Fatalf("aliases %v / %v", first, again)
	}
	// Keys learned by vmctl up are checked strictly, from their own file.
	if a := hostKeyArgs("web1", "c3d4", "/tmp/k", pins); !slices.Contains(a, "UserKnownHostsFile=/tmp/k") || !slices.Contains(a, "StrictHostKeyChecking=yes") {
		t.Fatalf("learned keys: %v", a)
	}
}

// Package datadir knows where an engine keeps its files by default, so
// clients on the engine's machine find its credentials by themselves.
package datadir

import (
	"os"
	"path/filepath"
)

// Default is $XDG_DATA_HOME/vmherd, else ~/.local/share/vmherd.
func Default() string {
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "vmherd")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "share", "vmherd")
	}
	return filepath.Join(os.TempDir(), "vmherd")
}

// AuthDir is where an engine with data dir dir keeps its keys and the
// credentials it issued.
func AuthDir(dir string) string { return filepath.Join(dir, "auth") }

// AdminCreds is the admin credentials file of the engine with data dir dir.
func AdminCreds(dir string) string { return filepath.Join(AuthDir(dir), "admin.creds") }

// LocalAdminCreds finds the admin credentials of the engine on this
// machine, for a client given none: in $VMHERD_DATA_DIR, else the default
// data dir. It returns "" unless the file exists and this user can read
// it (like a kubeconfig, or the docker socket's group).
func LocalAdminCreds() string {
	dir := os.Getenv("VMHERD_DATA_DIR")
	if dir == "" {
		dir = Default()
	}
	p := AdminCreds(dir)
	f, err := os.Open(p)
	if err != nil {
		return ""
	}
	f.Close()
	return p
}

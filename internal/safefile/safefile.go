// Package safefile writes files that hold secrets (credentials, nkey
// seeds, private keys) so that nobody else can read or redirect them: the
// content goes to a new file in the destination's directory, created
// exclusively (O_CREATE|O_EXCL|O_NOFOLLOW) with the mode asked for
// whatever the umask, synced, then renamed over the destination. A
// symlink planted at the destination is never followed, and an existing
// file's mode or owner is never kept (os.WriteFile did both: `engine creds
// -o FILE` wrote credentials through another user's symlink and left a
// 0666 file 0666).
package safefile

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// ErrNotRegular is returned for a destination that exists and is not a
// regular file (a symlink, a directory, a device, a FIFO): it is left
// alone rather than replaced or written through.
var ErrNotRegular = errors.New("not a regular file")

// Write replaces path with a new file holding data, with mode perm. The
// file is complete or absent: a crash leaves at most a temporary
// .<name>.*.tmp next to it.
func Write(path string, data []byte, perm fs.FileMode) error {
	if st, err := os.Lstat(path); err == nil && !st.Mode().IsRegular() {
		what := "a " + st.Mode().Type().String()
		if st.Mode()&fs.ModeSymlink != 0 {
			what = "a symbolic link"
		}
		return fmt.Errorf("writing %s: it is %s, %w; remove it or choose another path", path, what, ErrNotRegular)
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return err
	}
	tmp := filepath.Join(dir, "."+base+"."+hex.EncodeToString(rnd[:])+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|noFollow, perm&0o600)
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	done := false
	defer func() {
		if !done {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	// The umask cannot widen the mode, but it could narrow it.
	if err := f.Chmod(perm); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		_ = os.Remove(tmp)
		done = true
		return fmt.Errorf("writing %s: %w", path, err)
	}
	// rename replaces path itself, never what a symlink there names.
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		done = true
		return fmt.Errorf("writing %s: %w", path, err)
	}
	done = true
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // the rename itself, durable; best effort
		_ = d.Close()
	}
	return nil
}

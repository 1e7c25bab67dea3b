//go:build linux || darwin || dragonfly || freebsd || netbsd || openbsd || illumos || solaris

package app

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// lockFile takes an exclusive flock(2) on f without waiting. flock locks
// belong to the open file, not the process, so they also exclude a second
// lock taken in the same process, and are dropped when the file is closed
// or the process dies. (illumos implements flock with OFD locks.)
func lockFile(f *os.File) error {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EWOULDBLOCK), errors.Is(err, unix.EAGAIN):
			return errLocked
		default:
			return err
		}
	}
}

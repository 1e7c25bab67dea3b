//go:build !(linux || darwin || dragonfly || freebsd || netbsd || openbsd || illumos || solaris)

package app

import "os"

// lockFile has no kernel lock to take on this OS: the lock file only
// records the PID, and a second engine on the same data dir is not refused.
func lockFile(*os.File) error { return nil }

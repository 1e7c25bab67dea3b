package preflight

import "golang.org/x/sys/unix"

// freeGiB is the space free to unprivileged users under dir, in GiB.
func freeGiB(dir string) (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return st.Bavail * uint64(st.Bsize) >> 30, nil
}

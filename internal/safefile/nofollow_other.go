//go:build !unix

package safefile

// noFollow: O_EXCL alone refuses an existing name here.
const noFollow = 0

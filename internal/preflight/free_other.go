//go:build !linux

package preflight

import "errors"

// freeGiB is not measured off Linux yet.
func freeGiB(string) (uint64, error) { return 0, errors.New("free space not measured on this system") }

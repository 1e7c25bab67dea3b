package qemu

import (
	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/cloudinit"
)

// writeSeedISO writes the NoCloud seed image the VM boots with.
func writeSeedISO(path string, spec api.VmSpec) error { return cloudinit.WriteFile(path, spec) }

package qemu

import (
	"github.com/vmherd/vmherd/internal/cloudinit"
	"github.com/vmherd/vmherd/internal/vm"
)

// writeSeedISO writes the NoCloud seed image the VM boots with.
func writeSeedISO(path string, spec vm.VmSpec) error { return cloudinit.WriteFile(path, spec) }

package propolis

import (
	"github.com/vmherd/vmherd/internal/cloudinit"
	"github.com/vmherd/vmherd/internal/vm"
)

// seedISO builds the NoCloud seed image, sent inline as a blob disk.
func seedISO(spec vm.VmSpec) ([]byte, error) { return cloudinit.ISO(spec) }

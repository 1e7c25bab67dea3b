package propolis

import (
	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/cloudinit"
)

// seedISO builds the NoCloud seed image, sent inline as a blob disk.
func seedISO(spec api.VmSpec) ([]byte, error) { return cloudinit.ISO(spec) }

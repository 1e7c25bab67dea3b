package app

import (
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/vm"
)

func (o *WorkerOptions) buildBackend(tag vm.BackendTag, log *slog.Logger) (backends.Hypervisor, error) {
	switch tag {
	case vm.BackendNoop:
		if o.Noop != nil {
			return o.Noop, nil
		}
		if o.NoopFailRate < 0 || o.NoopFailRate > 1 {
			return nil, fmt.Errorf("--noop-fail-rate %v is not a fraction between 0 and 1", o.NoopFailRate)
		}
		dir := o.NoopStateDir
		if dir == "" && o.DataDir != "" {
			dir = filepath.Join(o.DataDir, "noop")
		}
		return noop.New(noop.Options{Latency: o.NoopLatency, FailRate: o.NoopFailRate, StateDir: dir}), nil
	case vm.BackendQEMU:
		return nil, fmt.Errorf("the qemu backend is not built yet")
	case vm.BackendPropolis:
		return nil, fmt.Errorf("the propolis backend is not built yet")
	}
	return nil, fmt.Errorf("unknown backend %q", tag)
}

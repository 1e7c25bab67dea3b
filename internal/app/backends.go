package app

import (
	"fmt"
	"log/slog"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/backends/propolis"
	"github.com/vmherd/vmherd/internal/backends/qemu"
)

func (o *WorkerOptions) buildBackend(tag api.BackendTag, log *slog.Logger) (backends.Hypervisor, error) {
	switch tag {
	case api.BackendNoop:
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
		opts := noop.Options{Latency: o.NoopLatency, FailRate: o.NoopFailRate, StateDir: dir}
		if o.NoopMigrateLatency > 0 {
			opts.CallLatency = map[string]time.Duration{noop.CallMigrate: o.NoopMigrateLatency}
		}
		return noop.New(opts), nil
	case api.BackendQEMU:
		if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
			return nil, fmt.Errorf("qemu-system-x86_64 not found on PATH (apt-get install qemu-system-x86 qemu-utils, or run scripts/setup)")
		}
		return qemu.New(qemu.Options{DataDir: o.DataDir, Accel: o.Accel, Host: o.Host, Logger: log.With("backend", "qemu"), ImageRoots: o.imageRoots(),
			MigrationTLSDir: o.MigrationTLSDir})
	case api.BackendPropolis:
		plog := log.With("backend", "propolis")
		if len(o.PropolisServers) > 0 {
			return propolis.New(propolis.Options{Servers: o.PropolisServers, Host: o.Host, Log: plog})
		}
		prov, err := propolis.NewHostProvisioner(propolis.HostOptions{
			ServerBin: o.PropolisBin, Bootrom: o.PropolisBootrom, ZvolParent: o.PropolisZvolParent,
			Link: o.PropolisLink, ListenIP: o.PropolisListenIP, PortBase: o.PropolisPortBase,
			StateDir: filepath.Join(o.DataDir, "propolis"),
		})
		if err != nil {
			return nil, err
		}
		return propolis.New(propolis.Options{Provisioner: prov, Host: o.Host, Log: plog})
	}
	return nil, fmt.Errorf("unknown backend %q", tag)
}

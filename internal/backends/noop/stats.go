package noop

import (
	"context"
	"fmt"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

// Simulated rates of the Noop backend's stats, per second the VM has run
// (suspensions do not count): each vCPU is busy a fifth of the time; the
// disk vda reads 64 KiB and writes 16 KiB in 4 KiB operations; the NIC
// sim0 receives 2 KiB in 4 packets and sends 1 KiB in 2; the process's
// resident memory grows by 1 MiB from 32 MiB up to the guest's memory.
const (
	simCPUShare     = 5 // 1/5 of a CPU per vCPU
	simDiskReadBps  = 64 << 10
	simDiskWriteBps = 16 << 10
	simDiskOpBytes  = 4 << 10
	simNetRxBps     = 2 << 10
	simNetTxBps     = 1 << 10
	simNetRxPps     = 4
	simNetTxPps     = 2
	simRSSBase      = 32 << 20
	simRSSGrowthBps = 1 << 20
	SimulatedDisk   = "vda"
	SimulatedNIC    = "sim0"
)

// run records the time the VM ran when it leaves the running state and
// when it enters it; a start (a new process) begins the count again.
func (e *entry) run(to api.VmState, start bool) {
	now := time.Now().UTC()
	if e.State == api.StateRunning && !e.RunningSince.IsZero() {
		e.Ran += now.Sub(e.RunningSince)
	}
	e.RunningSince = time.Time{}
	if start {
		e.Ran = 0
	}
	if to == api.StateRunning {
		e.RunningSince = now
	}
}

// Stats are simulated (Stats.Simulated): no process runs, so the
// counters are made up, growing at the rates above with the time the
// VM has run since it was started. A VM that is not running or
// suspended has none (ErrNotRunning).
func (b *Backend) Stats(_ context.Context, h api.VmHandle) (backends.Stats, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	e, err := b.lookup(h)
	if err != nil {
		return backends.Stats{}, err
	}
	if e.State != api.StateRunning && e.State != api.StateSuspended {
		return backends.Stats{}, fmt.Errorf("noop vm %s is %s: %w", h.Name, e.State, backends.ErrNotRunning)
	}
	now := time.Now().UTC()
	ran := e.Ran
	if e.State == api.StateRunning && !e.RunningSince.IsZero() {
		ran += now.Sub(e.RunningSince)
	}
	per := func(rate int64) int64 { return int64(float64(rate) * ran.Seconds()) }
	vcpus, mem := 1, int64(0)
	if e.H.Spec != nil {
		vcpus = max(e.H.Spec.Vcpus, 1)
		mem = int64(e.H.Spec.MemoryMB) << 20
	}
	s := backends.Stats{
		Time:        now,
		StartedAt:   e.H.StartedAt,
		State:       e.State,
		MemoryBytes: mem,
		RSSBytes:    simRSSBase + per(simRSSGrowthBps),
		Disks: []backends.DiskStats{{Device: SimulatedDisk,
			RdBytes: per(simDiskReadBps), WrBytes: per(simDiskWriteBps),
			RdOps: per(simDiskReadBps) / simDiskOpBytes, WrOps: per(simDiskWriteBps) / simDiskOpBytes}},
		Nets: []backends.NetStats{{Name: SimulatedNIC,
			RxBytes: per(simNetRxBps), TxBytes: per(simNetTxBps), RxPackets: per(simNetRxPps), TxPackets: per(simNetTxPps)}},
		Simulated: true,
	}
	if mem > 0 {
		s.RSSBytes = min(s.RSSBytes, mem)
	}
	for i := range vcpus {
		c := ran / simCPUShare
		s.Vcpus = append(s.Vcpus, backends.VcpuStats{Index: i, CPUTime: c})
		s.CPUTime += c
	}
	return s, nil
}

package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

var _ backends.Stater = (*Backend)(nil)

// userHZ is the unit of the CPU times in /proc/<pid>/stat (USER_HZ,
// sysconf(_SC_CLK_TCK)): 100 on every Linux architecture, and not
// readable without cgo.
const userHZ = 100

// NetsUnavailableUser is why a VM on user-mode networking has no network
// counters: QEMU's slirp keeps none that QMP reports, and there is no
// host device to read them from.
const NetsUnavailableUser = "user-mode networking: QEMU keeps no counters for it; tap networking has them"

// qmpBlockStats is one entry of query-blockstats.
type qmpBlockStats struct {
	Device   string `json:"device"`
	NodeName string `json:"node-name"`
	Qdev     string `json:"qdev"`
	Stats    struct {
		RdBytes int64 `json:"rd_bytes"`
		WrBytes int64 `json:"wr_bytes"`
		RdOps   int64 `json:"rd_operations"`
		WrOps   int64 `json:"wr_operations"`
	} `json:"stats"`
}

// qmpCPU is one entry of query-cpus-fast.
type qmpCPU struct {
	Index    int `json:"cpu-index"`
	ThreadID int `json:"thread-id"`
}

// Stats samples a running (or paused) VM: its state, disks and vCPU
// threads over QMP (query-status, query-blockstats, query-cpus-fast,
// query-balloon when the guest has a balloon), the QEMU process's CPU
// time, start and resident memory from /proc, and a tap device's
// counters from the host's side of it. User-mode networking has no
// counters (Stats.NetsUnavailable says so).
func (b *Backend) Stats(ctx context.Context, h api.VmHandle) (backends.Stats, error) {
	r, err := b.load(h)
	if err != nil {
		return backends.Stats{}, fmt.Errorf("stats of vm %s: %w", h.Name, err)
	}
	pid := b.livePID(r)
	if pid == 0 {
		return backends.Stats{}, fmt.Errorf("stats of vm %s: its QEMU process is not running: %w", h.Name, backends.ErrNotRunning)
	}
	spec := r.Handle.Spec
	s := backends.Stats{MemoryBytes: int64(spec.MemoryMB) << 20}
	var (
		status qmpStatus
		blocks []qmpBlockStats
		cpus   []qmpCPU
	)
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	// Each reply is the caller's own copy (sockMonitor), so the order
	// of the queries does not matter.
	err = withQMP(qctx, r.Handle.QMPSocket, func(m *monitor) error {
		var err error
		if status, err = m.status(qctx); err != nil {
			return err
		}
		// Without a balloon device QEMU answers an error: the
		// configured size stands.
		var balloon struct {
			Actual int64 `json:"actual"`
		}
		if m.run(qctx, "query-balloon", nil, &balloon) == nil && balloon.Actual > 0 {
			s.MemoryBytes = balloon.Actual
		}
		if err := m.run(qctx, "query-cpus-fast", nil, &cpus); err != nil {
			return err
		}
		return m.run(qctx, "query-blockstats", nil, &blocks)
	})
	if err != nil {
		if b.ifOurs(r, pid) == 0 { // it ended while we asked
			return backends.Stats{}, fmt.Errorf("stats of vm %s: its QEMU process ended: %w", h.Name, backends.ErrNotRunning)
		}
		return backends.Stats{}, fmt.Errorf("stats of vm %s: %w", h.Name, err)
	}
	s.State = mapStatus(status.Status)
	for _, bl := range blocks {
		name := bl.Device
		if name == "" {
			name = bl.NodeName
		}
		if name == "" {
			name = bl.Qdev
		}
		s.Disks = append(s.Disks, backends.DiskStats{Device: name,
			RdBytes: bl.Stats.RdBytes, WrBytes: bl.Stats.WrBytes, RdOps: bl.Stats.RdOps, WrOps: bl.Stats.WrOps})
	}

	ps, err := readProcStat(filepath.Join(b.opts.procRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return backends.Stats{}, fmt.Errorf("stats of vm %s: %w", h.Name, err)
	}
	s.CPUTime = ps.cpu
	if bt, err := bootTime(b.opts.procRoot); err == nil {
		s.StartedAt = bt.Add(ticks(ps.start)).UTC()
	} else {
		s.StartedAt = r.Handle.StartedAt
	}
	s.RSSBytes = readRSS(filepath.Join(b.opts.procRoot, strconv.Itoa(pid), "status"))
	for _, c := range cpus {
		v := backends.VcpuStats{Index: c.Index, ThreadID: c.ThreadID}
		if c.ThreadID > 0 {
			if ts, err := readProcStat(filepath.Join(b.opts.procRoot, strconv.Itoa(pid), "task", strconv.Itoa(c.ThreadID), "stat")); err == nil {
				v.CPUTime = ts.cpu
			}
		}
		s.Vcpus = append(s.Vcpus, v)
	}
	s.Time = time.Now().UTC()

	switch spec.Network.Type {
	case api.NetworkUser:
		s.NetsUnavailable = NetsUnavailableUser
	case api.NetworkTap:
		n, err := b.tapStats(ctx, r.Handle.TapDevice)
		if err != nil {
			s.NetsUnavailable = err.Error()
			break
		}
		s.Nets = []backends.NetStats{n}
	}
	return s, nil
}

// procStat is what Stats reads of /proc/<pid>/stat (or a thread's
// /proc/<pid>/task/<tid>/stat).
type procStat struct {
	cpu   time.Duration // utime + stime
	start uint64        // starttime, in clock ticks after boot
}

// readProcStat parses a stat file: the fields after "(comm)", where comm
// may hold spaces and parentheses, are space separated; utime and stime
// are fields 14 and 15, starttime field 22 (proc(5)).
func readProcStat(path string) (procStat, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return procStat{}, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("%s: no (comm) field", path)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): field n is f[n-3].
	if len(f) < 22-3+1 {
		return procStat{}, fmt.Errorf("%s: %d fields after comm, want at least 20", path, len(f))
	}
	num := func(n int) (uint64, error) {
		v, err := strconv.ParseUint(f[n-3], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: field %d: %w", path, n, err)
		}
		return v, nil
	}
	ut, err1 := num(14)
	st, err2 := num(15)
	start, err3 := num(22)
	if err := errors.Join(err1, err2, err3); err != nil {
		return procStat{}, err
	}
	return procStat{cpu: ticks(ut + st), start: start}, nil
}

func ticks(n uint64) time.Duration { return time.Duration(n) * (time.Second / userHZ) }

// bootTime is when the host booted: btime in /proc/stat.
func bootTime(procRoot string) (time.Time, error) {
	f, err := os.Open(filepath.Join(procRoot, "stat"))
	if err != nil {
		return time.Time{}, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "btime "); ok {
			sec, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return time.Time{}, fmt.Errorf("%s/stat: btime: %w", procRoot, err)
			}
			return time.Unix(sec, 0), nil
		}
	}
	return time.Time{}, fmt.Errorf("%s/stat has no btime line", procRoot)
}

// readRSS returns VmRSS of a /proc/<pid>/status file in bytes, 0 if
// absent.
func readRSS(path string) int64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v) // "123456 kB"
			if len(f) == 2 && f[1] == "kB" {
				if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
					return n << 10
				}
			}
		}
	}
	return 0
}

// tapStats reads a tap device's counters and turns them to the guest's
// side: what the host sends into the tap the guest receives. Without a
// wrapper they are in /sys/class/net/<tap>/statistics; with one the tap
// lives where the wrapper runs commands (a network namespace), so ip
// reads them there.
func (b *Backend) tapStats(ctx context.Context, tap string) (backends.NetStats, error) {
	var rxB, txB, rxP, txP int64 // the host's side
	if len(b.opts.Wrapper) == 0 {
		dir := filepath.Join(b.opts.sysRoot, "class", "net", tap, "statistics")
		var errs []error
		for _, c := range []struct {
			file string
			to   *int64
		}{{"rx_bytes", &rxB}, {"tx_bytes", &txB}, {"rx_packets", &rxP}, {"tx_packets", &txP}} {
			v, err := os.ReadFile(filepath.Join(dir, c.file))
			if err == nil {
				*c.to, err = strconv.ParseInt(strings.TrimSpace(string(v)), 10, 64)
			}
			errs = append(errs, err)
		}
		if err := errors.Join(errs...); err != nil {
			return backends.NetStats{}, fmt.Errorf("counters of tap device %s: %w", tap, err)
		}
	} else {
		out, err := b.ip(ctx, "-s", "-j", "link", "show", "dev", tap)
		if err != nil {
			return backends.NetStats{}, fmt.Errorf("counters of tap device %s: %w", tap, err)
		}
		var links []struct {
			Stats struct {
				Rx struct{ Bytes, Packets int64 } `json:"rx"`
				Tx struct{ Bytes, Packets int64 } `json:"tx"`
			} `json:"stats64"`
		}
		if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
			return backends.NetStats{}, fmt.Errorf("counters of tap device %s: ip -s -j link show printed %.200q", tap, out)
		}
		st := links[0].Stats
		rxB, txB, rxP, txP = st.Rx.Bytes, st.Tx.Bytes, st.Rx.Packets, st.Tx.Packets
	}
	return backends.NetStats{Name: tap, RxBytes: txB, TxBytes: rxB, RxPackets: txP, TxPackets: rxP}, nil
}

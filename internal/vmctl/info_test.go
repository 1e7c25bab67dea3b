package vmctl

import (
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
)

// Rates between two samples of one process; none across a restart (a new
// started_at, or counters that went back).
func TestTopRates(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	a := api.StatsReply{VM: "web1", Time: t0, StartedAt: t0.Add(-time.Minute), CPUNS: 10e9,
		Disks: []api.DiskStats{{Device: "disk", RdBytes: 1000, WrBytes: 2000, RdOps: 1, WrOps: 2}, {Device: "seed", RdBytes: 10}},
		Nets:  []api.NetStats{{Name: "tap0", RxBytes: 100, TxBytes: 200}}}
	b := a
	b.Time, b.CPUNS = t0.Add(2*time.Second), 11e9
	b.Disks = []api.DiskStats{{Device: "disk", RdBytes: 5000, WrBytes: 4000, RdOps: 5, WrOps: 6}, {Device: "seed", RdBytes: 10}}
	b.Nets = []api.NetStats{{Name: "tap0", RxBytes: 2100, TxBytes: 1200}}
	s, ok := rates(a, b)
	if !ok {
		t.Fatal("no rates between two samples of one process")
	}
	if s.CPUPercent != 50 || s.IntervalMS != 2000 || s.DiskRdBytesPS != 2000 || s.DiskWrBytesPS != 1000 || s.DiskRdOpsPS != 2 || s.DiskWrOpsPS != 2 ||
		s.NetRxBytesPS == nil || *s.NetRxBytesPS != 1000 || *s.NetTxBytesPS != 500 {
		t.Fatalf("rates = %+v", s)
	}
	// No NIC counters: no net rates.
	a2, b2 := a, b
	a2.Nets, b2.Nets, b2.NetsUnavailable = nil, nil, "user-mode networking"
	if s, _ := rates(a2, b2); s.NetRxBytesPS != nil || s.NetsUnavailable == "" {
		t.Fatalf("rates without NIC counters = %+v", s)
	}
	restarted := b
	restarted.StartedAt = b.Time.Add(-time.Second)
	if _, ok := rates(a, restarted); ok {
		t.Fatal("rates across a restart")
	}
	back := b
	back.CPUNS = 1
	if _, ok := rates(a, back); ok {
		t.Fatal("rates from counters that went back")
	}
	if _, ok := rates(b, a); ok {
		t.Fatal("rates backwards in time")
	}
}

func TestBytesText(t *testing.T) {
	for n, want := range map[int64]string{0: "0B", 1023: "1023B", 1024: "1.0K", 1536: "1.5K", 256 << 20: "256.0M", 3 << 30: "3.0G"} {
		if got := bytesText(n); got != want {
			t.Errorf("bytesText(%d) = %q, want %q", n, got, want)
		}
	}
}

package qemu

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/backends"
)

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// The /proc files Stats reads: a comm with spaces and parentheses does
// not shift the fields; CPU times are in USER_HZ ticks.
func TestProcStatsParsing(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	// pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime prio nice threads itreal starttime ...
	writeFile(t, filepath.Join(dir, "42", "stat"), "42 (qemu (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 7 20 0 5 0 123456 987654 321 18446744073709551615\n")
	ps, err := readProcStat(filepath.Join(dir, "42", "stat"))
	if err != nil {
		t.Fatal(err)
	}
	if ps.cpu != 3*time.Second || ps.start != 123456 {
		t.Fatalf("readProcStat = %+v, want cpu 3s (300 ticks) start 123456", ps)
	}
	writeFile(t, filepath.Join(dir, "43", "stat"), "43 (short) S 1 2 3\n")
	if _, err := readProcStat(filepath.Join(dir, "43", "stat")); err == nil {
		t.Fatal("a truncated stat file parsed")
	}
	writeFile(t, filepath.Join(dir, "42", "status"), "Name:\tqemu\nVmPeak:\t  999 kB\nVmRSS:\t  204800 kB\nThreads:\t5\n")
	if got := readRSS(filepath.Join(dir, "42", "status")); got != 200<<20 {
		t.Fatalf("readRSS = %d, want %d", got, 200<<20)
	}
	if got := readRSS(filepath.Join(dir, "nope", "status")); got != 0 {
		t.Fatalf("readRSS of no file = %d", got)
	}
	writeFile(t, filepath.Join(dir, "stat"), "cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n")
	bt, err := bootTime(dir)
	if err != nil || !bt.Equal(time.Unix(1700000000, 0)) {
		t.Fatalf("bootTime = %s, %v", bt, err)
	}
	// The real ones parse too.
	if ps, err := readProcStat("/proc/self/stat"); err != nil || ps.start == 0 {
		t.Fatalf("/proc/self/stat: %+v, %v", ps, err)
	}
	if readRSS("/proc/self/status") <= 0 {
		t.Fatal("no VmRSS in /proc/self/status")
	}
	if bt, err := bootTime("/proc"); err != nil || bt.After(time.Now()) {
		t.Fatalf("boot time %s, %v", bt, err)
	}
}

// A tap device's counters, read from sysfs and turned to the guest's
// side: what the host sends into the tap, the guest receives.
func TestTapStatsSysfs(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	st := filepath.Join(dir, "class", "net", "vmtap0", "statistics")
	for f, v := range map[string]string{"rx_bytes": "1000\n", "tx_bytes": "5000\n", "rx_packets": "10\n", "tx_packets": "50\n"} {
		writeFile(t, filepath.Join(st, f), v)
	}
	b := &Backend{opts: Options{sysRoot: dir}}
	n, err := b.tapStats(context.Background(), "vmtap0")
	if err != nil {
		t.Fatal(err)
	}
	if want := (backends.NetStats{Name: "vmtap0", RxBytes: 5000, TxBytes: 1000, RxPackets: 50, TxPackets: 10}); n != want {
		t.Fatalf("tapStats = %+v, want %+v", n, want)
	}
	if _, err := b.tapStats(context.Background(), "vmtap9"); err == nil {
		t.Fatal("counters of a missing tap device")
	}
}

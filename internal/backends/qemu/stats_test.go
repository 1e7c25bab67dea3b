package qemu_test

import (
	"errors"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/provision"
)

// TestStatsGuest boots the test guest and reads its live counters: the
// QEMU process's CPU time, resident memory and start, its vCPU thread,
// the disk's counters over QMP. Writing 1 MiB to the guest's disk moves
// wr_bytes by at least that; a counter printing on the console moves
// the CPU time. User networking has no network counters and says so.
func TestStatsGuest(t *testing.T) {
	t.Parallel()
	img := guestImage(t)
	b := newBackend(t, qemu.Options{})
	priv, pub, err := provision.NewKey("test@vmherd")
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	spec := testSpec(img, "stats1")
	spec.SSH = &api.SshConfig{User: "root", PublicKey: pub}
	ctx := ctxT(t, bootTimeout+3*time.Minute)
	h, err := b.Prepare(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Destroy(ctx, h) })
	if _, err := b.Stats(ctx, h); !errors.Is(err, backends.ErrNotRunning) {
		t.Fatalf("Stats of a prepared VM = %v, want ErrNotRunning", err)
	}
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	waitConsole(t, qd(h).SerialLog, 0, guestimage.ReadyMarker, bootTimeout)

	s1, err := b.Stats(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first sample: state %s, cpu %s, rss %d MiB, started %s, vcpus %+v, disks %+v", s1.State, s1.CPUTime, s1.RSSBytes>>20,
		s1.StartedAt.Format(time.RFC3339), s1.Vcpus, s1.Disks)
	if s1.State != api.StateRunning || s1.CPUTime <= 0 || s1.RSSBytes <= 0 || s1.MemoryBytes != 128<<20 || s1.Simulated {
		t.Fatalf("Stats = %+v", s1)
	}
	if d := s1.StartedAt.Sub(h.StartedAt); d < -5*time.Second || d > 5*time.Second {
		t.Errorf("process start %s, the handle says %s", s1.StartedAt, h.StartedAt)
	}
	if len(s1.Vcpus) != 1 || s1.Vcpus[0].ThreadID <= 0 || s1.Vcpus[0].CPUTime <= 0 || s1.Vcpus[0].CPUTime > s1.CPUTime {
		t.Errorf("vcpus %+v (process cpu %s): want one with its own thread and part of the process's CPU time", s1.Vcpus, s1.CPUTime)
	}
	if len(s1.Nets) != 0 || s1.NetsUnavailable != qemu.NetsUnavailableUser {
		t.Errorf("user networking: nets %+v, unavailable %q", s1.Nets, s1.NetsUnavailable)
	}
	var names []string
	for _, d := range s1.Disks {
		names = append(names, d.Device)
	}
	if !slices.Contains(names, "disk") {
		t.Fatalf("disks %v: no \"disk\" (the VM's disk node)", names)
	}
	disk := func(s backends.Stats) backends.DiskStats {
		for _, d := range s.Disks {
			if d.Device == "disk" {
				return d
			}
		}
		return backends.DiskStats{}
	}
	if d := disk(s1); d.RdBytes == 0 || d.RdOps == 0 {
		t.Errorf("the booted guest read nothing from its disk: %+v", d)
	}

	// How long a sample takes (QMP connect, four commands, /proc).
	var lat []time.Duration
	for range 20 {
		began := time.Now()
		if _, err := b.Stats(ctx, h); err != nil {
			t.Fatal(err)
		}
		lat = append(lat, time.Since(began))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	t.Logf("Stats latency over 20 samples: min %s, median %s, max %s", lat[0].Round(time.Microsecond), lat[10].Round(time.Microsecond), lat[19].Round(time.Microsecond))

	// 1 MiB written near the end of the disk (in the overlay only), and a
	// counter on the console for a while.
	hostKeys := map[string][]ssh.PublicKey{}
	before := disk(s1)
	guestRun(t, hostKeys, h, signer, "s=$(cat /sys/block/vda/size); dd if=/dev/urandom of=/dev/vda bs=512 count=2048 seek=$((s-4096)) conv=fsync 2>/dev/null")
	guestRun(t, hostKeys, h, signer, "setsid sh -c 'i=0; while :; do echo TICK $i >/dev/ttyS0; i=$((i+1)); sleep 0.1; done' </dev/null >/dev/null 2>&1 &")
	waitConsole(t, qd(h).SerialLog, 0, "TICK 20", time.Minute)
	s2, err := b.Stats(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	after := disk(s2)
	t.Logf("after writing 1 MiB: disk %+v (was %+v); cpu %s (was %s), rss %d MiB", after, before, s2.CPUTime, s1.CPUTime, s2.RSSBytes>>20)
	if after.WrBytes-before.WrBytes < 1<<20 || after.WrOps <= before.WrOps {
		t.Errorf("disk wr_bytes grew by %d, wr_ops by %d; want at least 1 MiB written", after.WrBytes-before.WrBytes, after.WrOps-before.WrOps)
	}
	if s2.CPUTime <= s1.CPUTime || s2.Vcpus[0].CPUTime <= s1.Vcpus[0].CPUTime || !s2.StartedAt.Equal(s1.StartedAt) {
		t.Errorf("cpu %s then %s, vcpu %s then %s, start %s then %s", s1.CPUTime, s2.CPUTime, s1.Vcpus[0].CPUTime, s2.Vcpus[0].CPUTime, s1.StartedAt, s2.StartedAt)
	}
	ticks := regexp.MustCompile(`TICK \d+`)
	if b, _ := os.ReadFile(qd(h).SerialLog); len(ticks.FindAll(b, -1)) < 20 {
		t.Errorf("the console counter printed %d ticks", len(ticks.FindAll(b, -1)))
	}

	// Paused: QMP says so.
	if h, err = b.Suspend(ctx, h); err != nil {
		t.Fatal(err)
	}
	if s, err := b.Stats(ctx, h); err != nil || s.State != api.StateSuspended {
		t.Fatalf("Stats of a paused VM: %s, %v", s.State, err)
	}
	if h, err = b.Resume(ctx, h); err != nil {
		t.Fatal(err)
	}
	if h, err = b.Stop(ctx, h, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Stats(ctx, h); !errors.Is(err, backends.ErrNotRunning) || !strings.Contains(err.Error(), "not running") {
		t.Fatalf("Stats of a stopped VM = %v, want ErrNotRunning", err)
	}
}

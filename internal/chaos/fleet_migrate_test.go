package chaos_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/fleet"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/relay"
	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
)

// qemuProcs lists the QEMU processes running guest name whose files are
// under dir (every netns host's QEMU is a process on this machine).
func qemuProcs(dir, name string) []int {
	var pids []int
	dirs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, d := range dirs {
		b, err := os.ReadFile(d)
		if err != nil || !strings.Contains(string(b), "qemu-system") || !strings.Contains(string(b), "guest="+name+"\x00") || !strings.Contains(string(b), dir) {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(d)))
		if processAlive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// guestConsole is a console attached to a VM through its host's worker.
type guestConsole struct {
	t   *testing.T
	rw  io.ReadWriteCloser
	out syncbuf.Buffer
}

func attachConsole(t *testing.T, ctx context.Context, nc *nats.Conn, host, name string) *guestConsole {
	t.Helper()
	rw, err := relay.AttachConsole(ctx, nc, api.DefaultNames, host, name)
	if err != nil {
		t.Fatalf("console of %s on %s: %v", name, host, err)
	}
	c := &guestConsole{t: t, rw: rw}
	go func() { _, _ = io.Copy(&c.out, rw) }()
	t.Cleanup(func() { _ = rw.Close() })
	return c
}

// booted waits until the guest has printed its ready marker.
func (c *guestConsole) booted(what string, within time.Duration) {
	c.t.Helper()
	for deadline := time.Now().Add(within); !strings.Contains(c.out.String(), guestimage.ReadyMarker); time.Sleep(200 * time.Millisecond) {
		if time.Now().After(deadline) {
			c.t.Fatalf("%s never booted:\n%s", what, tailOf(c.out.String(), 2000))
		}
	}
}

// run types a command and waits for a line matching re after it; it
// returns the first submatch.
func (c *guestConsole) run(cmd string, re *regexp.Regexp, timeout time.Duration) string {
	c.t.Helper()
	from := len(c.out.String())
	if _, err := c.rw.Write([]byte(cmd + "\n")); err != nil {
		c.t.Fatal(err)
	}
	for deadline := time.Now().Add(timeout); ; time.Sleep(100 * time.Millisecond) {
		if m := re.FindStringSubmatch(c.out.String()[from:]); m != nil {
			return m[len(m)-1]
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("console: %q: no %s within %s; got:\n%s", cmd, re, timeout, tailOf(c.out.String()[from:], 2000))
		}
	}
}

// TestFleetMigrateQEMU moves real QEMU guests between two hosts, each in
// its own network namespace, with vmctl from a third: a running guest
// with a block written to its disk and a counter on its console goes
// h1 -> h2 -> h1 live and keeps its disk, boot id and counter; its SSH
// port answers on the new host; the record names the new host and one
// QEMU process runs it. It then moves suspended (and stays suspended)
// and stopped (cold: it boots on the other host with its disk). Finally
// `vmctl host drain` empties a host of three VMs (running, suspended,
// stopped), each keeping its state.
func TestFleetMigrateQEMU(t *testing.T) {
	_, err := os.Stat("/usr/bin/qemu-system-x86_64")
	testenv.Require(t, err == nil, "qemu-system-x86_64 is not installed")
	image := guestimage.EnsureForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	wargs := []string{"--image-dir", filepath.Dir(image)}
	// Binaries without the race detector: the QEMU guests under TCG
	// already fill this machine's two cores (the worker's migration code
	// runs under -race in TestMigrateNoop and TestMigrateFaults, the
	// backend's in TestLiveMigration).
	f := upFleet(t, ctx, fleet.Config{Engines: 1, Bin: testenv.PlainBinaries(t), Hosts: []fleet.HostConfig{
		{Name: "h1", Backends: "noop,qemu", WorkerArgs: wargs},
		{Name: "h2", Backends: "noop,qemu", WorkerArgs: wargs},
	}})
	ns := map[string]string{"h1": f.Hosts["h1"].NetNS, "h2": f.Hosts["h2"].NetNS}
	vmctl := func(args ...string) string {
		t.Helper()
		out, code := f.Vmctl(ctx, "", args...)
		if code != 0 {
			t.Fatalf("vmctl %v: exit %d\n%s", args, code, out)
		}
		return out
	}
	type status struct {
		Record struct {
			State  string `json:"state"`
			Host   string `json:"host"`
			Handle struct {
				PID  int      `json:"pid"`
				Data struct { // the QEMU backend's (qemu.HandleData)
					SSHPort int `json:"ssh_port"`
				} `json:"data"`
			} `json:"handle"`
		} `json:"record"`
	}
	statusOf := func(name string) status {
		t.Helper()
		var s status
		if err := json.Unmarshal([]byte(vmctl("status", name, "--json")), &s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	// where checks the record and that exactly one QEMU runs the guest.
	where := func(name, host, state string, running bool) status {
		t.Helper()
		s := statusOf(name)
		if s.Record.Host != host || s.Record.State != state {
			t.Fatalf("%s: record says %s on %s, want %s on %s", name, s.Record.State, s.Record.Host, state, host)
		}
		want := 0
		if running {
			want = 1
		}
		for deadline := time.Now().Add(30 * time.Second); len(qemuProcs(f.Dir(), name)) != want; time.Sleep(200 * time.Millisecond) {
			if time.Now().After(deadline) {
				var which []string
				for _, pid := range qemuProcs(f.Dir(), name) {
					b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
					if m := regexp.MustCompile(`-pidfile\x00([^\x00]+)`).FindSubmatch(b); m != nil {
						which = append(which, fmt.Sprintf("%d %s", pid, m[1]))
					}
				}
				t.Fatalf("%s: %d QEMU processes run it, want %d: %v", name, len(which), want, which)
			}
		}
		return s
	}
	sshBanner := func(name string) {
		t.Helper()
		s := statusOf(name)
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
			out, code := f.Exec(ctx, ns[s.Record.Host], "timeout", "5", "bash", "-c",
				fmt.Sprintf("exec 3<>/dev/tcp/127.0.0.1/%d && head -n 1 <&3", s.Record.Handle.Data.SSHPort))
			if code == 0 && strings.HasPrefix(out, "SSH-") {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: no SSH banner on %s port %d: %q", name, s.Record.Host, s.Record.Handle.Data.SSHPort, out)
			}
		}
	}
	nc, err := nats.Connect(f.URLs, f.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	bootRE := regexp.MustCompile(`BOOT=([0-9a-f-]{36})`)
	markRE := regexp.MustCompile(`MARK=(\S*)\r?\n`)
	ctrRE := regexp.MustCompile(`CTR (\d+)`)
	// The console echoes what is typed: the quotes keep the command's
	// echo from matching what its output matches.
	const readMark = "s=$(cat /sys/block/vda/size); echo MA''RK=$(dd if=/dev/vda bs=512 skip=$((s-16)) count=1 2>/dev/null | head -c 12)"
	lastCtr := func(c *guestConsole) int {
		m := ctrRE.FindAllStringSubmatch(c.out.String(), -1)
		if len(m) == 0 {
			return -1
		}
		n, _ := strconv.Atoi(m[len(m)-1][1])
		return n
	}

	vmctl("create", "q1", "--backend", "qemu", "--image", image, "--memory", "256", "--host", "h1", "--start")
	con := attachConsole(t, ctx, nc, "h1", "q1")
	con.booted("q1", 3*time.Minute)
	boot := con.run("echo BOOT=$(cat /proc/sys/kernel/random/boot_id)", bootRE, 30*time.Second)
	con.run("s=$(cat /sys/block/vda/size); echo FLEETMARK-1 | dd of=/dev/vda bs=512 seek=$((s-16)) conv=fsync 2>/dev/null; echo WRO''TE", regexp.MustCompile(`(WROTE)`), 30*time.Second)
	con.run("(i=0; while :; do echo CTR $i; i=$((i+1)); sleep 0.5; done) & echo STAR''TED", regexp.MustCompile(`(STARTED)`), 30*time.Second)
	con.run("true", ctrRE, 10*time.Second)
	where("q1", "h1", "running", true)

	for i, to := range []string{"h2", "h1"} {
		before := lastCtr(con)
		args := []string{"migrate", "q1"}
		if i == 0 {
			args = append(args, "--to", to) // the second is placed: the only other host
		}
		out := vmctl(args...)
		if !strings.Contains(out, "migrated") {
			t.Fatalf("vmctl migrate: %s", out)
		}
		t.Logf("migrate q1 to %s: %s", to, strings.TrimSpace(out))
		where("q1", to, "running", true)
		con = attachConsole(t, ctx, nc, to, "q1")
		if got := con.run("echo BOOT=$(cat /proc/sys/kernel/random/boot_id)", bootRE, 30*time.Second); got != boot {
			t.Fatalf("after the move to %s the boot id is %s, was %s: the guest rebooted", to, got, boot)
		}
		if got := con.run(readMark, markRE, 30*time.Second); got != "FLEETMARK-1" {
			t.Fatalf("after the move to %s the disk block reads %q", to, got)
		}
		for deadline := time.Now().Add(20 * time.Second); lastCtr(con) <= before; time.Sleep(200 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the console counter did not go on past %d on %s:\n%s", before, to, tailOf(con.out.String(), 1000))
			}
		}
		sshBanner("q1")
		if ip := vmctl("ip", "q1"); !strings.Contains(ip, strconv.Itoa(statusOf("q1").Record.Handle.Data.SSHPort)) {
			t.Fatalf("vmctl ip after the move to %s: %s (the record's port is %d)", to, ip, statusOf("q1").Record.Handle.Data.SSHPort)
		}
		// vmctl ssh reaches the guest's SSH server through the new host's
		// worker (the login itself needs a key, which provisioning tests).
		if out, _ := f.Vmctl(ctx, "", "ssh", "q1", "--", "-v", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "true"); !strings.Contains(out, "remote software version dropbear") {
			t.Fatalf("vmctl ssh after the move to %s did not reach the guest:\n%s", to, tailOf(out, 2000))
		}
	}
	if out := vmctl("history", "q1"); !strings.Contains(out, "migrated") || !strings.Contains(out, "target_ready") || !strings.Contains(out, "downtime=") {
		t.Fatalf("history lacks the migration's phases:\n%s", out)
	}

	// Suspended: moves and stays suspended.
	vmctl("suspend", "q1")
	vmctl("migrate", "q1", "--to", "h2")
	where("q1", "h2", "suspended", true)
	vmctl("resume", "q1")
	con = attachConsole(t, ctx, nc, "h2", "q1")
	if got := con.run("echo BOOT=$(cat /proc/sys/kernel/random/boot_id)", bootRE, 30*time.Second); got != boot {
		t.Fatalf("after a suspended move and resume the boot id is %s, was %s", got, boot)
	}
	// Stopped: moves cold and boots on h1 with its disk.
	vmctl("stop", "q1", "--stop-timeout", "60s")
	vmctl("migrate", "q1", "--to", "h1")
	where("q1", "h1", "stopped", false)
	vmctl("start", "q1")
	con = attachConsole(t, ctx, nc, "h1", "q1")
	con.booted("q1 after its cold move", 3*time.Minute)
	if got := con.run(readMark, markRE, 30*time.Second); got != "FLEETMARK-1" {
		t.Fatalf("after the cold move the disk block reads %q", got)
	}

	// Drain: h1 has q1 running, q2 suspended, q3 stopped.
	vmctl("create", "q2", "--backend", "qemu", "--image", image, "--memory", "256", "--host", "h1", "--start")
	vmctl("create", "q3", "--backend", "qemu", "--image", image, "--memory", "256", "--host", "h1", "--start")
	vmctl("suspend", "q2")
	vmctl("stop", "q3", "--stop-timeout", "60s")
	out, code := f.Vmctl(ctx, "", "host", "drain", "h1")
	if code != 0 || !strings.Contains(out, "host h1 is drained: its 3 VMs moved") {
		t.Fatalf("drain h1: exit %d\n%s", code, out)
	}
	where("q1", "h2", "running", true)
	where("q2", "h2", "suspended", true)
	where("q3", "h2", "stopped", false)
	for _, d := range []string{"q1", "q2", "q3"} {
		if _, err := os.Stat(filepath.Join(f.Dir(), "host-h1", "vms", d)); err == nil {
			t.Errorf("%s: h1 keeps its work dir after the drain", d)
		}
	}
	counts := testenv.AttachTLS(t, strings.Split(f.URLs, ",")[0], f.AdminCreds(), f.TLS.CA).CheckStreams()
	if counts.Duplicates != 0 || counts.Lost != 0 {
		t.Errorf("streams: %s", counts)
	}
	t.Logf("streams: %s", counts)
}

package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/worker"
)

// Migrate is figure 7: a live migration of the idle test guest between
// two hosts on this machine (two QEMU backends with data dirs of their
// own, migration traffic on loopback), through vmherd (the migrate
// command, from publish to its migrated result, with an engine and a
// worker per host in process) and directly (the QEMU backend's Receive,
// Send and Activate called in a row: the same QMP steps, blockdev-mirror
// and migrate, with no NATS, engine or worker). Downtime is what the
// guest shows: the gap in a counter it prints on its console every 10 ms,
// timed by watching both hosts' console logs from outside.
type Migrate struct {
	Skipped string `json:"skipped,omitempty"`
	Rounds  int    `json:"rounds"`
	// Network says where the two hosts' QEMUs ran.
	Network string `json:"network"`
	// Total: vmherd from publish to the migrated result; directly from
	// Receive to the end of Activate.
	VmherdMs  []float64 `json:"vmherd_ms"`
	DirectMs  []float64 `json:"direct_ms"`
	VmherdMed float64   `json:"vmherd_median_ms"`
	DirectMed float64   `json:"direct_median_ms"`
	Ratio     float64   `json:"ratio"`
	// Downtime seen in the guest's console counter, and as QEMU reports it.
	VmherdDownMs      []float64 `json:"vmherd_downtime_ms"`
	DirectDownMs      []float64 `json:"direct_downtime_ms"`
	VmherdDownMed     float64   `json:"vmherd_downtime_median_ms"`
	DirectDownMed     float64   `json:"direct_downtime_median_ms"`
	VmherdQEMUDownMed float64   `json:"vmherd_qemu_downtime_median_ms"`
	DirectQEMUDownMed float64   `json:"direct_qemu_downtime_median_ms"`
}

// consoleWatch records when a console log last grew and first grew after
// a moment, polling its size every millisecond.
type consoleWatch struct {
	mu   sync.Mutex
	grew map[string][]time.Time
	stop chan struct{}
	done chan struct{}
}

func watchConsoles(paths ...string) *consoleWatch {
	w := &consoleWatch{grew: map[string][]time.Time{}, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		size := map[string]int64{}
		for {
			select {
			case <-w.stop:
				return
			case <-time.After(time.Millisecond):
			}
			now := time.Now()
			for _, p := range paths {
				if st, err := os.Stat(p); err == nil && st.Size() != size[p] {
					size[p] = st.Size()
					w.mu.Lock()
					w.grew[p] = append(w.grew[p], now)
					w.mu.Unlock()
				}
			}
		}
	}()
	return w
}

// gap is the time from the source's last output to the target's first
// output after it, once the target has printed; the watch ends.
func (w *consoleWatch) gap(src, dst string, within time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(within)
	for {
		w.mu.Lock()
		s, d := w.grew[src], w.grew[dst]
		w.mu.Unlock()
		if len(s) > 0 && len(d) > 0 && d[len(d)-1].After(s[len(s)-1]) {
			last := s[len(s)-1]
			for _, t := range d {
				if t.After(last) {
					close(w.stop)
					<-w.done
					return t.Sub(last), nil
				}
			}
		}
		if time.Now().After(deadline) {
			close(w.stop)
			<-w.done
			return 0, fmt.Errorf("the guest printed nothing on the target within %s", within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// typeInto writes a line to a VM's serial console socket.
func typeInto(sock, line string) error {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(line + "\n"))
	time.Sleep(200 * time.Millisecond) // QEMU reads it before the socket closes
	return err
}

const counterLoop = "(while :; do echo T; sleep 0.01; done) >/dev/ttyS0 2>&1 &"

func migrateBench(ctx context.Context, url, dir string, rounds int, logf func(string, ...any)) (Migrate, error) {
	res := Migrate{Rounds: rounds}
	if why := qemuAvailable(); why != "" {
		res.Skipped = why
		return res, nil
	}
	cache, err := guestimage.DefaultCacheDir()
	if err != nil {
		res.Skipped = "no guest image cache dir: " + err.Error()
		return res, nil
	}
	img, err := guestimage.Build(ctx, cache)
	if err != nil {
		res.Skipped = "test guest image cannot be built: " + err.Error()
		return res, nil
	}
	roots := []string{filepath.Dir(img)}
	// Two hosts: network namespaces joined by a veth pair, each host's
	// QEMUs run inside its own (as root); else loopback.
	nets, cleanup, why := benchNetns()
	defer cleanup()
	res.Network = why
	addr := map[string]string{}
	newQ := func(name string, host int) (*qemu.Backend, error) {
		o := qemu.Options{DataDir: filepath.Join(dir, name), Host: name, Logger: quietLogger(), ImageRoots: roots}
		addr[name] = "127.0.0.1"
		if nets != nil {
			o.Wrapper = []string{"ip", "netns", "exec", nets[host].ns}
			addr[name] = nets[host].addr
		}
		return qemu.New(o)
	}
	// Through vmherd: hosts bench1 (with the engine) and mig2.
	q1, err := newQ(benchHost, 0)
	if err != nil {
		return res, err
	}
	q2, err := newQ("mig2", 1)
	if err != nil {
		return res, err
	}
	p, err := startPipeline(ctx, pipelineConfig{URL: url, StateDir: filepath.Join(dir, "engine"),
		Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: q1}, Default: api.BackendQEMU, ImageRoots: roots,
		Migration: worker.MigrationConfig{Listen: addr[benchHost]}})
	if err != nil {
		return res, err
	}
	defer p.close()
	stop2, err := startExtraWorker(ctx, url, "mig2", q2, roots, addr["mig2"])
	if err != nil {
		return res, err
	}
	defer stop2()
	for deadline := time.Now().Add(30 * time.Second); !p.Engine.Hosts().Alive("mig2"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			return res, errors.New("the second worker's heartbeat did not reach the engine")
		}
	}
	cl, err := newClient(ctx, url)
	if err != nil {
		return res, err
	}
	defer cl.close()
	n := 0
	do := func(action, data string) (*api.Event, time.Duration, error) {
		n++
		id := "mg-" + strconv.Itoa(n)
		if data == "" {
			data = fmt.Sprintf(`{"command_id":%q}`, id)
		} else {
			data = fmt.Sprintf(`{"command_id":%q,%s}`, id, data)
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
		sent, o, err := cl.doBody(cctx, "mg", action, id, []byte(data))
		if err != nil {
			return nil, 0, err
		}
		if !o.ok() {
			return nil, 0, fmt.Errorf("%s: %s %s", action, o.Type, o.Reason)
		}
		ev, err := events.Decode(o.Data)
		return ev, o.At.Sub(sent), err
	}
	ev, _, err := do("prepare", fmt.Sprintf(`"host":%q,"spec":{"name":"mg","backend":"qemu","image_path":%q,"vcpus":1,"memory_mb":128,"network":{"type":"user"}}`, benchHost, img))
	if err != nil {
		return res, err
	}
	if ev, _, err = do("start", ""); err != nil {
		return res, err
	}
	if err := waitConsole(ctx, qemuData(*ev.Handle).SerialLog, guestimage.ReadyMarker, 5*time.Minute); err != nil {
		return res, err
	}
	if err := typeInto(qemuData(*ev.Handle).SerialSock, counterLoop); err != nil {
		return res, err
	}
	h := *ev.Handle
	logs := map[string]string{benchHost: filepath.Join(dir, benchHost, "vms", "mg", "console.log"), "mig2": filepath.Join(dir, "mig2", "vms", "mg", "console.log")}

	// Directly: the same guest on two backends of their own.
	d1, err := newQ("dir1", 0)
	if err != nil {
		return res, err
	}
	d2, err := newQ("dir2", 1)
	if err != nil {
		return res, err
	}
	dh, err := d1.Prepare(ctx, api.VmSpec{Name: "dg", Backend: api.BackendQEMU, ImagePath: img, Vcpus: 1, MemoryMB: 128, Network: &api.NetworkConfig{Type: api.NetworkUser}})
	if err != nil {
		return res, err
	}
	if dh, err = d1.Start(ctx, dh); err != nil {
		return res, err
	}
	defer func() {
		for _, b := range []*qemu.Backend{d1, d2} {
			_ = b.Destroy(context.WithoutCancel(ctx), api.VmHandle{Name: "dg"})
		}
	}()
	if err := waitConsole(ctx, qemuData(dh).SerialLog, guestimage.ReadyMarker, 5*time.Minute); err != nil {
		return res, err
	}
	if err := typeInto(qemuData(dh).SerialSock, counterLoop); err != nil {
		return res, err
	}
	dbs := []*qemu.Backend{d1, d2}
	var vq, dq []float64
	for i := range rounds {
		// vmherd: to the other host.
		from, to := h.Host, map[string]string{benchHost: "mig2", "mig2": benchHost}[h.Host]
		time.Sleep(300 * time.Millisecond)
		cw := watchConsoles(logs[from], logs[to])
		ev, took, err := do("migrate", fmt.Sprintf(`"host":%q`, to))
		if err != nil {
			return res, fmt.Errorf("round %d through vmherd: %w", i, err)
		}
		down, err := cw.gap(logs[from], logs[to], 30*time.Second)
		if err != nil {
			return res, fmt.Errorf("round %d through vmherd: %w", i, err)
		}
		h = *ev.Handle
		res.VmherdMs = append(res.VmherdMs, ms(took))
		res.VmherdDownMs = append(res.VmherdDownMs, ms(down))
		vq = append(vq, float64(ev.Migration.DowntimeMS))

		// Directly.
		src, dst := dbs[i%2], dbs[(i+1)%2]
		spec := *dh.Spec
		srcH := dh
		srcH.Spec = &spec
		time.Sleep(300 * time.Millisecond)
		dlogSrc := qemuData(dh).SerialLog
		dlogDst := filepath.Join(dir, []string{"dir1", "dir2"}[(i+1)%2], "vms", "dg", "console.log")
		cw = watchConsoles(dlogSrc, dlogDst)
		t0 := time.Now()
		cp, ep, err := dst.Receive(ctx, srcH, img, backends.Receiving{Mode: "live", Listen: addr[[]string{"dir1", "dir2"}[(i+1)%2]], PortLo: 49300, PortHi: 49399})
		if err != nil {
			return res, fmt.Errorf("round %d directly: %w", i, err)
		}
		pr, err := src.Send(ctx, dh, ep, backends.SendOptions{Stall: time.Minute, DowntimeMS: 300}, func(backends.MigrationProgress) {})
		if err != nil {
			return res, fmt.Errorf("round %d directly: %w", i, err)
		}
		nh, err := dst.Activate(ctx, cp, api.StateRunning)
		if err != nil {
			return res, fmt.Errorf("round %d directly: %w", i, err)
		}
		dtook := time.Since(t0)
		ddown, err := cw.gap(dlogSrc, dlogDst, 30*time.Second)
		if err != nil {
			return res, fmt.Errorf("round %d directly: %w", i, err)
		}
		if err := src.Destroy(ctx, dh); err != nil {
			return res, err
		}
		dh = nh
		res.DirectMs = append(res.DirectMs, ms(dtook))
		res.DirectDownMs = append(res.DirectDownMs, ms(ddown))
		dq = append(dq, float64(pr.DowntimeMS))
		logf("  migrate round %d: vmherd %.0f ms (guest paused %.0f ms), direct %.0f ms (guest paused %.0f ms)", i+1, ms(took), ms(down), ms(dtook), ms(ddown))
	}
	res.VmherdMed, res.DirectMed = median(res.VmherdMs), median(res.DirectMs)
	res.Ratio = ratio(res.VmherdMed, res.DirectMed)
	res.VmherdDownMed, res.DirectDownMed = median(res.VmherdDownMs), median(res.DirectDownMs)
	res.VmherdQEMUDownMed, res.DirectQEMUDownMed = median(vq), median(dq)
	_, _, _ = do("destroy", "")
	return res, nil
}

// startExtraWorker runs one more in-process worker, for host, with the
// QEMU backend b (and Noop).
func startExtraWorker(ctx context.Context, url, host string, b backends.Hypervisor, roots []string, listen string) (func(), error) {
	router, err := backends.NewRouter(api.BackendQEMU, map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: b})
	if err != nil {
		return nil, err
	}
	nc, js, err := connect(url, "bench-worker-"+host)
	if err != nil {
		return nil, err
	}
	w, err := worker.New(ctx, worker.Config{
		NC: nc, JS: js, Names: api.DefaultNames, Host: host, Router: router, Log: quietLogger(),
		HeartbeatEvery: time.Second, Capacity: api.Resources{Vcpus: 1 << 20, MemoryMB: 1 << 40}, ImageRoots: roots,
		Migration: worker.MigrationConfig{Listen: listen},
	})
	if err != nil {
		nc.Close()
		return nil, err
	}
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	go func() { _ = w.Run(rctx); close(done) }()
	return func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
		}
		nc.Close()
	}, nil
}

// benchNet is one of the bench's two host namespaces.
type benchNet struct{ ns, addr string }

// benchNetns makes two network namespaces joined by a veth pair
// (10.77.0.1 and 10.77.0.2). Without root (or ip) it returns nil and says
// why: the hosts then share loopback.
func benchNetns() ([]benchNet, func(), string) {
	nets := []benchNet{{"vmhbench1", "10.77.0.1"}, {"vmhbench2", "10.77.0.2"}}
	cleanup := func() {
		for _, n := range nets {
			_ = exec.Command("ip", "netns", "del", n.ns).Run()
		}
	}
	if os.Geteuid() != 0 {
		return nil, func() {}, "loopback (not root: no network namespaces)"
	}
	cleanup()
	steps := [][]string{
		{"netns", "add", nets[0].ns}, {"netns", "add", nets[1].ns},
		{"link", "add", "vmhbenchA", "netns", nets[0].ns, "type", "veth", "peer", "name", "vmhbenchB", "netns", nets[1].ns},
	}
	for i, n := range nets {
		dev := []string{"vmhbenchA", "vmhbenchB"}[i]
		steps = append(steps,
			[]string{"-n", n.ns, "link", "set", "lo", "up"},
			[]string{"-n", n.ns, "addr", "add", n.addr + "/24", "dev", dev},
			[]string{"-n", n.ns, "link", "set", dev, "up"})
	}
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			cleanup()
			return nil, func() {}, fmt.Sprintf("loopback (ip %s: %v: %s)", strings.Join(s, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nets, cleanup, "two network namespaces joined by a veth pair (10.77.0.1, 10.77.0.2), each host's QEMU in its own"
}

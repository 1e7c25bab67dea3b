package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

// Migration, the QEMU way without shared storage (as libvirt, Incus and
// Proxmox do it): the target runs QEMU paused with -incoming defer on the
// same devices, over an empty overlay on its own copy of the base image,
// and exports that overlay over NBD; the source mirrors only its top
// layer into it (blockdev-mirror sync=top), then migrates memory and
// device state (migrate, with auto-converge and a downtime limit); the
// source ends paused, the target waits paused (-S) until Activate.
// A cold move copies the overlay file itself (qemu-nbd export on the
// source, qemu-img convert on the target), checked by sha256.

var _ backends.Migrator = (*Backend)(nil)

// Keys of VmHandle.Extra for a copy that waits for its switch.
const (
	extraIncomingOf = "incoming_of"       // the source incarnation's handle id
	extraIncomingEP = "incoming_endpoint" // where the source sends (live)
	extraOutgoing   = "outgoing_to"       // the source started a migration to this address
	extraExportEP   = "export_endpoint"   // cold: where the source serves its disk
)

// TLS on the migration link (Options.MigrationTLSDir).
const (
	tlsPrefix   = "tls+" // an endpoint that takes TLS only
	tlsServerID = "vmherd-tls-server"
	tlsClientID = "vmherd-tls-client"
)

// tlsEndpoint splits a "tls+" prefix off an endpoint, checking that this
// host's TLS setting agrees with the other side's.
func (b *Backend) tlsEndpoint(ep string) (string, bool, error) {
	rest, tls := strings.CutPrefix(ep, tlsPrefix)
	switch {
	case tls && b.opts.MigrationTLSDir == "":
		return "", false, errors.New("the other host takes migrations over TLS only, and this one has no TLS files (worker --migration-tls-dir)")
	case !tls && b.opts.MigrationTLSDir != "":
		return "", false, errors.New("this host migrates over TLS only (--migration-tls-dir), and the other host offers no TLS")
	}
	return rest, tls, nil
}

const (
	nbdExport   = "disk"
	mirrorJob   = "vmherd-mirror"
	mirrorNode  = "vmherd-mirror-target"
	exportID    = "vmherd-export"
	nbdPidFile  = "nbd.pid"
	pollEvery   = 100 * time.Millisecond
	maxBandwith = 10 << 30 // bytes/s: QEMU's default (32 MiB/s) would make a migration crawl
)

// Receive makes the waiting copy of src (see backends.Migrator).
func (b *Backend) Receive(ctx context.Context, src api.VmHandle, base string, r backends.Receiving) (api.VmHandle, string, error) {
	h, ep, err := b.receive(ctx, src, base, r)
	if err != nil {
		return api.VmHandle{}, "", fmt.Errorf("receiving vm %s: %w", src.Name, err)
	}
	return h, ep, nil
}

func (b *Backend) receive(ctx context.Context, src api.VmHandle, base string, rc backends.Receiving) (api.VmHandle, string, error) {
	if src.Spec == nil {
		return api.VmHandle{}, "", errors.New("the source handle has no spec")
	}
	spec := *src.Spec
	srcData, err := DataOf(src) // the source host's backend is this one
	if err != nil {
		return api.VmHandle{}, "", err
	}
	// What the source host wrote reaches this host's QEMU command line:
	// only a spec that passes admission's checks, a MAC that is one and
	// an accelerator this backend names.
	check := spec
	check.Labels = nil // metadata no backend reads; rules may have grown since the VM was made
	if err := check.Validate(); err != nil {
		return api.VmHandle{}, "", fmt.Errorf("the source handle's spec: %w", err)
	}
	if srcData.MAC != "" {
		hw, err := net.ParseMAC(srcData.MAC)
		if err != nil || len(hw) != 6 {
			return api.VmHandle{}, "", fmt.Errorf("%w: the source handle's mac %.40q is not a MAC-48 address", api.ErrInvalid, srcData.MAC)
		}
		srcData.MAC = hw.String()
	}
	switch srcData.Accel {
	case "", AccelKVM, AccelTCG:
	default:
		return api.VmHandle{}, "", fmt.Errorf("%w: the source handle's accel %.40q is not %s or %s", api.ErrInvalid, srcData.Accel, AccelKVM, AccelTCG)
	}
	if spec.UEFI {
		return api.VmHandle{}, "", fmt.Errorf("a UEFI vm's variable store is not migrated: %w", backends.ErrUnsupported)
	}
	wd, err := b.workDir(src.Name)
	if err != nil {
		return api.VmHandle{}, "", err
	}
	unlock, err := b.lockCtx(ctx, src.Name)
	if err != nil {
		return api.VmHandle{}, "", err
	}
	defer unlock()
	if old, err := readRecord(wd); err == nil {
		old.Handle.WorkDir = wd
		switch {
		case old.Handle.Extra[extraIncomingOf] == "":
			return api.VmHandle{}, "", fmt.Errorf("host %s already has a vm %s (being removed after an earlier migration?); try again", b.opts.Host, src.Name)
		case old.Handle.Extra[extraIncomingOf] == src.ID && (rc.Mode != "live" || b.livePID(old) != 0):
			return old.Handle.Clone(), old.Handle.Extra[extraIncomingEP], nil // made before: the same copy
		}
		b.kill(ctx, old)
	}
	chain, err := b.inspectChain(ctx, base, "")
	if err != nil {
		return api.VmHandle{}, "", err
	}
	info := chain[0]
	if err := os.RemoveAll(wd); err != nil {
		return api.VmHandle{}, "", err
	}
	if err := os.Mkdir(wd, 0o700); err != nil {
		return api.VmHandle{}, "", fmt.Errorf("creating work dir: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = os.RemoveAll(wd)
		}
	}()
	disk := filepath.Join(wd, diskFile)
	if rc.Mode == "cold" {
		if err := b.copyFrom(ctx, rc, disk); err != nil {
			return api.VmHandle{}, "", err
		}
		// The copy names the source's file of the base; point it at ours.
		if err := b.qemuImg(ctx, "rebase", "-u", "-f", "qcow2", "-F", info.Format, "-b", info.Path, disk); err != nil {
			return api.VmHandle{}, "", err
		}
	} else {
		size := max(info.VirtualSize, int64(spec.DiskGB)<<30)
		if err := b.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-u", "-F", info.Format, "-b", info.Path, disk, strconv.FormatInt(size, 10)); err != nil {
			return api.VmHandle{}, "", err
		}
	}
	if err := writeSeedISO(filepath.Join(wd, seedFile), spec); err != nil {
		return api.VmHandle{}, "", err
	}
	for _, f := range []string{disk, filepath.Join(wd, seedFile)} {
		if err := os.Chmod(f, 0o600); err != nil {
			return api.VmHandle{}, "", err
		}
	}
	if err := touch(filepath.Join(wd, consoleLog)); err != nil {
		return api.VmHandle{}, "", err
	}
	s := spec
	h := handle{
		VmHandle: api.VmHandle{ID: newID(), Name: src.Name, Backend: api.BackendQEMU, Host: b.opts.Host, WorkDir: wd,
			Spec: &s, StartedAt: src.StartedAt},
		HandleData: HandleData{
			QMPSocket: filepath.Join(wd, qmpSock), SerialSock: filepath.Join(wd, serialSock), SerialLog: filepath.Join(wd, consoleLog),
			Extra: map[string]string{ExtraBaseFmt: info.Format, extraIncomingOf: src.ID},
		},
	}
	rec := &record{Version: 1, Handle: h, Chain: chain}
	b.allocMu.Lock()
	err = b.allocate(&rec.Handle)
	rec.Handle.MAC = srcData.MAC // the guest's NIC keeps its address
	if err == nil {
		err = rec.save()
	}
	b.allocMu.Unlock()
	if err != nil {
		return api.VmHandle{}, "", err
	}
	if rc.Mode == "cold" {
		rec.Handle.StartedAt = time.Time{}
		ok = rec.save() == nil
		return rec.Handle.Clone(), "", nil
	}
	ep, err := b.listenIncoming(ctx, rec, srcData.Accel, rc)
	if err != nil {
		b.kill(ctx, rec)
		return api.VmHandle{}, "", err
	}
	ok = true
	b.log.Info("waiting for an incoming migration", "vm", h.Name, "id", rec.Handle.ID, "endpoint", ep)
	return rec.Handle.Clone(), ep, nil
}

// listenIncoming starts the paused QEMU that waits for the source, its
// NBD export of the overlay and its incoming migration.
func (b *Backend) listenIncoming(ctx context.Context, r *record, accel string, rc backends.Receiving) (string, error) {
	if accel == "" {
		accel = AccelTCG
	}
	if accel == AccelKVM {
		if a, _ := detectAccel(b.opts.procRoot, b.opts.sysRoot, b.opts.devKVM); a != AccelKVM {
			return "", fmt.Errorf("the vm runs with KVM on its host and this host has no usable KVM")
		}
	}
	if r.Handle.Spec.Network.Type == api.NetworkTap {
		if _, err := b.ensureTap(ctx, r.Handle.TapDevice, r.Handle.Spec.Network.Bridge); err != nil {
			return "", err
		}
	}
	// One copy sets up its listeners at a time, skipping the ports the
	// others hold, so two receives never pick the same ones.
	b.portMu.Lock()
	defer b.portMu.Unlock()
	ports, err := freePorts(rc.Listen, rc.PortLo, rc.PortHi, 2, b.heldPorts(r.Handle.Name))
	if err != nil {
		return "", err
	}
	if err := b.launch(ctx, r, accel, "-incoming", "defer", "-S"); err != nil {
		return "", fmt.Errorf("for the incoming migration: %w", err)
	}
	pid := readPidfile(r.path(pidFile))
	if pid == 0 {
		return "", fmt.Errorf("QEMU did not write its pidfile%s", b.diagnostics(r))
	}
	host := rc.Listen
	ep := fmt.Sprintf("%s|%s", net.JoinHostPort(host, strconv.Itoa(ports[0])), net.JoinHostPort(host, strconv.Itoa(ports[1])))
	qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tlsDir := b.opts.MigrationTLSDir
	if tlsDir != "" {
		ep = tlsPrefix + ep
	}
	err = withQMP(qctx, r.Handle.QMPSocket, func(m *monitor) error {
		nbd := map[string]any{
			"addr": map[string]any{"type": "inet", "data": map[string]any{"host": host, "port": strconv.Itoa(ports[0])}},
		}
		if tlsDir != "" {
			// Both the disk's export and the incoming memory take only
			// a peer whose certificate the CA signed.
			if err := m.run(qctx, "object-add", map[string]any{
				"qom-type": "tls-creds-x509", "id": tlsServerID, "dir": tlsDir, "endpoint": "server", "verify-peer": true,
			}, nil); err != nil {
				return fmt.Errorf("loading the migration TLS files of %s: %w", tlsDir, err)
			}
			nbd["tls-creds"] = tlsServerID
			if err := m.run(qctx, "migrate-set-parameters", map[string]any{"tls-creds": tlsServerID}, nil); err != nil {
				return err
			}
		}
		if err := m.run(qctx, "nbd-server-start", nbd, nil); err != nil {
			return err
		}
		if err := m.run(qctx, "block-export-add", map[string]any{
			"type": "nbd", "id": exportID, "node-name": "disk", "name": nbdExport, "writable": true,
		}, nil); err != nil {
			return err
		}
		// The copy's disk stays inactive (no locks taken, the export
		// undisturbed) until Activate resumes it, not as soon as the
		// memory has arrived.
		if err := m.run(qctx, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{
			{"capability": "late-block-activate", "state": true},
		}}, nil); err != nil {
			return err
		}
		return m.run(qctx, "migrate-incoming", map[string]any{"uri": "tcp:" + net.JoinHostPort(host, strconv.Itoa(ports[1]))}, nil)
	})
	if err != nil {
		return "", fmt.Errorf("setting up the incoming migration: %w%s", err, b.diagnostics(r))
	}
	_ = os.Chmod(r.path(vncSock), 0o600)
	r.Handle.PID = pid
	r.Handle.Accel = accel
	r.Handle.Extra[extraIncomingEP] = ep
	return ep, r.save()
}

// heldPorts are the ports other VMs' copies and exports on this host
// listen on (or are about to).
func (b *Backend) heldPorts(skip string) map[int]bool {
	held := map[int]bool{}
	for _, o := range b.allRecords(skip) {
		for _, ep := range strings.Split(o.Handle.Extra[extraIncomingEP]+"|"+o.Handle.Extra[extraExportEP], "|") {
			if _, p, err := net.SplitHostPort(strings.TrimSuffix(strings.TrimPrefix(ep, "nbd://"), "/"+nbdExport)); err == nil {
				n, _ := strconv.Atoi(p)
				held[n] = true
			}
		}
	}
	return held
}

// hostPort splits an endpoint another host's worker reported into a
// host that is an IP address or a plain DNS name and a port number, so
// nothing else reaches QEMU's option strings or URIs (a comma would add
// options there).
func hostPort(addr string) (string, string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", "", fmt.Errorf("migration endpoint %q: %w", addr, err)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 || strconv.Itoa(p) != port {
		return "", "", fmt.Errorf("migration endpoint %q: the port is not a number in 1..65535", addr)
	}
	if net.ParseIP(host) == nil && (host == "" || strings.Trim(host, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-") != "") {
		return "", "", fmt.Errorf("migration endpoint %q: the host is neither an IP address nor a DNS name", addr)
	}
	return host, port, nil
}

// freePorts finds n ports of lo..hi free on host now and not held.
func freePorts(host string, lo, hi, n int, held map[int]bool) ([]int, error) {
	var out []int
	for p := lo; p <= hi && len(out) < n; p++ {
		if held[p] {
			continue
		}
		l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(p)))
		if errors.Is(err, syscall.EADDRNOTAVAIL) {
			// The address is not in this process's network namespace
			// (QEMU runs in another, through Options.Wrapper): QEMU's own
			// bind is the check.
			out = append(out, p)
			continue
		}
		if err != nil {
			continue
		}
		l.Close()
		out = append(out, p)
	}
	if len(out) < n {
		return nil, fmt.Errorf("no %d free ports in %d-%d on %s (--migration-ports)", n, lo, hi, host)
	}
	return out, nil
}

// kill ends a copy's QEMU (if any) and removes its work dir.
func (b *Backend) kill(ctx context.Context, r *record) {
	if pid := b.livePID(r); pid != 0 {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		b.waitGone(wctx, r, pid)
		cancel()
	}
	b.stopExport(r)
	if r.Handle.TapDevice != "" {
		_ = b.deleteTap(context.WithoutCancel(ctx), r.Handle.TapDevice)
	}
	_ = os.RemoveAll(r.Handle.WorkDir)
}

// Send mirrors the disk's top layer and migrates the guest to endpoint.
func (b *Backend) Send(ctx context.Context, h api.VmHandle, endpoint string, o backends.SendOptions, progress func(backends.MigrationProgress)) (backends.MigrationProgress, error) {
	p, err := b.send(ctx, h, endpoint, o, progress)
	if err != nil {
		return p, fmt.Errorf("migrating vm %s: %w", h.Name, err)
	}
	return p, nil
}

type blockJob struct {
	Device string `json:"device"`
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
	Ready  bool   `json:"ready"`
	Status string `json:"status"`
}

type migrateInfo struct {
	Status   string `json:"status"`
	Downtime int64  `json:"downtime"`
	Error    string `json:"error-desc"`
	RAM      *struct {
		Transferred int64 `json:"transferred"`
		Remaining   int64 `json:"remaining"`
		Total       int64 `json:"total"`
	} `json:"ram"`
}

func (b *Backend) send(ctx context.Context, h api.VmHandle, endpoint string, o backends.SendOptions, progress func(backends.MigrationProgress)) (backends.MigrationProgress, error) {
	var out backends.MigrationProgress
	endpoint, tls, err := b.tlsEndpoint(endpoint)
	if err != nil {
		return out, err
	}
	nbdAddr, migAddr, ok := strings.Cut(endpoint, "|")
	if !ok {
		return out, fmt.Errorf("endpoint %q is not <nbd host:port>|<migration host:port>", endpoint)
	}
	nhost, nport, err := hostPort(nbdAddr)
	if err != nil {
		return out, err
	}
	if _, _, err := hostPort(migAddr); err != nil {
		return out, err
	}
	r, err := b.load(h)
	if err != nil {
		return out, err
	}
	if b.livePID(r) == 0 {
		return out, fmt.Errorf("its QEMU is not running: %w", backends.ErrNotRunning)
	}
	if o.Stall <= 0 {
		o.Stall = time.Minute
	}
	m, err := dialQMP(ctx, r.Handle.QMPSocket)
	if err != nil {
		return out, err
	}
	defer m.close()
	var mi migrateInfo
	if err := m.run(ctx, "query-migrate", nil, &mi); err != nil {
		return out, err
	}
	outgoing := r.Handle.Extra[extraOutgoing] == migAddr
	if mi.Status == "completed" && outgoing {
		out.Phase, out.DowntimeMS = "switchover", mi.Downtime
		return out, nil // a worker that restarted finds it done
	}
	// A QEMU that came in by migration reports that one completed: only
	// a migration this host started to this endpoint counts.
	if !outgoing || (mi.Status != "active" && mi.Status != "setup" && mi.Status != "device" && mi.Status != "pre-switchover") {
		// Disk first: mirror the top layer into the target's overlay.
		var jobs []blockJob
		if err := m.run(ctx, "query-block-jobs", nil, &jobs); err != nil {
			return out, err
		}
		if tls {
			// Loaded once per QEMU (a repeat says it exists).
			_ = m.run(ctx, "object-add", map[string]any{
				"qom-type": "tls-creds-x509", "id": tlsClientID, "dir": b.opts.MigrationTLSDir, "endpoint": "client",
			}, nil)
		}
		if !hasJob(jobs, mirrorJob) {
			_ = m.run(ctx, "blockdev-del", map[string]any{"node-name": mirrorNode}, nil)
			target := map[string]any{
				"driver": "nbd", "node-name": mirrorNode, "export": nbdExport,
				"server": map[string]any{"type": "inet", "host": nhost, "port": nport},
			}
			if tls {
				target["tls-creds"] = tlsClientID
			}
			if err := m.run(ctx, "blockdev-add", target, nil); err != nil {
				return out, fmt.Errorf("connecting to the target's disk at %s: %w", nbdAddr, err)
			}
			mirror := map[string]any{"job-id": mirrorJob, "device": "disk", "target": mirrorNode, "sync": "top"}
			if o.BandwidthBps > 0 {
				mirror["speed"] = o.BandwidthBps
			}
			if err := m.run(ctx, "blockdev-mirror", mirror, nil); err != nil {
				return out, fmt.Errorf("mirroring the disk: %w", err)
			}
		}
		last, lastAt := int64(-1), time.Now()
		for {
			if err := m.run(ctx, "query-block-jobs", nil, &jobs); err != nil {
				return out, err
			}
			j, found := job(jobs, mirrorJob)
			if !found {
				return out, errors.New("the disk mirror ended before it was in sync (the target's disk went away?)")
			}
			out = backends.MigrationProgress{Phase: "copying", Bytes: j.Offset, Total: j.Len}
			progress(out)
			if j.Ready {
				break
			}
			if j.Offset != last {
				last, lastAt = j.Offset, time.Now()
			} else if time.Since(lastAt) > o.Stall {
				return out, fmt.Errorf("the disk mirror made no progress for %s", o.Stall)
			}
			if err := sleepCtx(ctx, pollEvery); err != nil {
				return out, err
			}
		}
		disk := out.Bytes
		// Then memory and devices.
		if err := m.run(ctx, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{
			{"capability": "auto-converge", "state": true},
		}}, nil); err != nil {
			return out, err
		}
		downtime := o.DowntimeMS
		if downtime <= 0 {
			downtime = 300
		}
		bw := int64(maxBandwith)
		if o.BandwidthBps > 0 {
			bw = o.BandwidthBps
		}
		params := map[string]any{"downtime-limit": downtime, "max-bandwidth": bw, "tls-creds": ""}
		if tls {
			mhost, _, _ := net.SplitHostPort(migAddr)
			params["tls-creds"], params["tls-hostname"] = tlsClientID, mhost
		}
		if err := m.run(ctx, "migrate-set-parameters", params, nil); err != nil {
			return out, err
		}
		if r.Handle.Extra == nil {
			r.Handle.Extra = map[string]string{}
		}
		r.Handle.Extra[extraOutgoing] = migAddr
		if err := r.save(); err != nil {
			return out, err
		}
		if err := m.run(ctx, "migrate", map[string]any{"uri": "tcp:" + migAddr}, nil); err != nil {
			return out, fmt.Errorf("starting the migration to %s: %w", migAddr, err)
		}
		out.Bytes = disk
	}
	disk := out.Bytes
	last, lastAt := int64(-1), time.Now()
	for {
		if err := m.run(ctx, "query-migrate", nil, &mi); err != nil {
			return out, err
		}
		switch mi.Status {
		case "completed":
			out.Phase, out.DowntimeMS = "switchover", mi.Downtime
			if mi.RAM != nil {
				out.Bytes, out.Total = disk+mi.RAM.Transferred, disk+mi.RAM.Transferred
			}
			// The mirror is in sync and the guest paused: end it.
			_ = m.run(ctx, "block-job-cancel", map[string]any{"device": mirrorJob}, nil)
			return out, nil
		case "failed", "cancelled", "cancelling":
			return out, fmt.Errorf("QEMU's migration %s: %s", mi.Status, mi.Error)
		}
		if mi.RAM != nil {
			out = backends.MigrationProgress{Phase: "copying", Bytes: disk + mi.RAM.Transferred, Total: disk + mi.RAM.Total}
			progress(out)
			if mi.RAM.Transferred != last {
				last, lastAt = mi.RAM.Transferred, time.Now()
			}
		}
		if time.Since(lastAt) > o.Stall {
			_ = m.run(context.WithoutCancel(ctx), "migrate_cancel", nil, nil)
			return out, fmt.Errorf("the migration made no progress for %s", o.Stall)
		}
		if err := sleepCtx(ctx, pollEvery); err != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			_ = m.run(cctx, "migrate_cancel", nil, nil)
			cancel()
			return out, err
		}
	}
}

func hasJob(jobs []blockJob, id string) bool { _, ok := job(jobs, id); return ok }

func job(jobs []blockJob, id string) (blockJob, bool) {
	for _, j := range jobs {
		if j.Device == id {
			return j, true
		}
	}
	return blockJob{}, false
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// Recover undoes a send on the source: the migration and the mirror end,
// and the guest runs again if it ran before.
func (b *Backend) Recover(ctx context.Context, h api.VmHandle, before api.VmState) (api.VmHandle, error) {
	r, unlock, err := b.lockLoad(ctx, h)
	if err != nil {
		return h, fmt.Errorf("recovering vm %s: %w", h.Name, err)
	}
	defer unlock()
	b.stopExport(r)
	if b.livePID(r) == 0 {
		return r.Handle.Clone(), nil
	}
	qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err = withQMP(qctx, r.Handle.QMPSocket, func(m *monitor) error {
		var mi migrateInfo
		if err := m.run(qctx, "query-migrate", nil, &mi); err == nil && (mi.Status == "active" || mi.Status == "setup" || mi.Status == "device" || mi.Status == "pre-switchover") {
			_ = m.run(qctx, "migrate_cancel", nil, nil)
			for i := 0; i < 100; i++ {
				if m.run(qctx, "query-migrate", nil, &mi) != nil || (mi.Status != "active" && mi.Status != "cancelling") {
					break
				}
				time.Sleep(pollEvery)
			}
		}
		var jobs []blockJob
		if err := m.run(qctx, "query-block-jobs", nil, &jobs); err == nil && hasJob(jobs, mirrorJob) {
			_ = m.run(qctx, "block-job-cancel", map[string]any{"device": mirrorJob, "force": true}, nil)
			for i := 0; i < 100; i++ {
				if m.run(qctx, "query-block-jobs", nil, &jobs) != nil || !hasJob(jobs, mirrorJob) {
					break
				}
				time.Sleep(pollEvery)
			}
		}
		_ = m.run(qctx, "blockdev-del", map[string]any{"node-name": mirrorNode}, nil)
		st, err := m.status(qctx)
		if err != nil {
			return err
		}
		if before == api.StateRunning && st.Status != "running" {
			if err := m.run(qctx, "cont", nil, nil); err != nil {
				return fmt.Errorf("resuming the guest: %w", err)
			}
		}
		return nil
	})
	if err != nil {
		return r.Handle.Clone(), fmt.Errorf("recovering vm %s: %w", h.Name, err)
	}
	if _, ok := r.Handle.Extra[extraOutgoing]; ok {
		delete(r.Handle.Extra, extraOutgoing)
		_ = r.save()
	}
	b.log.Info("recovered vm after a migration that did not switch", "vm", h.Name, "state", before)
	return r.Handle.Clone(), nil
}

// Activate makes the waiting copy the VM once its switch is stored.
func (b *Backend) Activate(ctx context.Context, h api.VmHandle, before api.VmState) (api.VmHandle, error) {
	r, unlock, err := b.lockLoad(ctx, h)
	if err != nil {
		return h, fmt.Errorf("activating vm %s: %w", h.Name, err)
	}
	defer unlock()
	if r.Handle.Extra[extraIncomingOf] == "" {
		return r.Handle.Clone(), nil // activated before
	}
	if pid := b.livePID(r); pid != 0 {
		qctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		err = withQMP(qctx, r.Handle.QMPSocket, func(m *monitor) error {
			// The last of the state may still be loading.
			for {
				st, err := m.status(qctx)
				if err != nil {
					return err
				}
				if st.Status != "inmigrate" {
					if st.Status != "paused" && st.Status != "postmigrate" && st.Status != "running" {
						return fmt.Errorf("the copy is %q after the migration, not paused", st.Status)
					}
					break
				}
				if err := sleepCtx(qctx, 20*time.Millisecond); err != nil {
					return fmt.Errorf("the copy still loads the migration: %w", err)
				}
			}
			_ = m.run(qctx, "block-export-del", map[string]any{"id": exportID}, nil)
			_ = m.run(qctx, "nbd-server-stop", nil, nil)
			if before == api.StateRunning {
				if err := m.run(qctx, "cont", nil, nil); err != nil {
					return fmt.Errorf("resuming the guest: %w", err)
				}
			}
			return nil
		})
		if err != nil {
			return r.Handle.Clone(), fmt.Errorf("activating vm %s: %w%s", h.Name, err, b.diagnostics(r))
		}
		r.Handle.PID = pid
	}
	delete(r.Handle.Extra, extraIncomingOf)
	delete(r.Handle.Extra, extraIncomingEP)
	if err := r.save(); err != nil {
		return r.Handle.Clone(), err
	}
	if r.Handle.PID != 0 {
		b.setOwned(r.Handle)
	}
	b.log.Info("activated migrated vm", "vm", h.Name, "id", r.Handle.ID, "pid", r.Handle.PID, "state", before)
	return r.Handle.Clone(), nil
}

// Abandon removes a waiting copy; a VM that is not one is never touched.
func (b *Backend) Abandon(ctx context.Context, h api.VmHandle) error {
	wd, err := b.workDir(h.Name)
	if err != nil {
		return err
	}
	unlock, err := b.lockCtx(ctx, h.Name)
	if err != nil {
		return err
	}
	defer unlock()
	r, err := readRecord(wd)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if r.Handle.Extra[extraIncomingOf] == "" {
		return nil
	}
	r.Handle.WorkDir = wd
	b.kill(ctx, r)
	b.log.Info("removed an incoming copy whose migration did not switch", "vm", h.Name, "id", r.Handle.ID)
	return nil
}

// Export serves the VM's overlay file, read-only, for a cold move.
func (b *Backend) Export(ctx context.Context, h api.VmHandle, l backends.Receiving) (string, int64, string, error) {
	listen := l.Listen
	r, unlock, err := b.lockLoad(ctx, h)
	if err != nil {
		return "", 0, "", err
	}
	defer unlock()
	if b.livePID(r) != 0 {
		return "", 0, "", fmt.Errorf("vm %s runs: a cold move needs it prepared or stopped", h.Name)
	}
	disk := r.path(diskFile)
	st, err := os.Stat(disk)
	if err != nil {
		return "", 0, "", err
	}
	digest, err := fileDigest(disk)
	if err != nil {
		return "", 0, "", err
	}
	b.stopExport(r)
	b.portMu.Lock()
	defer b.portMu.Unlock()
	ports, err := freePorts(listen, l.PortLo, l.PortHi, 1, b.heldPorts(r.Handle.Name))
	if err != nil {
		return "", 0, "", err
	}
	argv := append(append([]string{}, b.opts.Wrapper...), b.nbdBinary(), "--read-only", "--format=raw", "--shared=1", "--persistent",
		"--bind="+listen, "--port="+strconv.Itoa(ports[0]), "--export-name="+nbdExport, "--fork", "--pid-file="+r.path(nbdPidFile))
	prefix := ""
	if d := b.opts.MigrationTLSDir; d != "" {
		argv = append(argv, "--object", "tls-creds-x509,id="+tlsServerID+",dir="+qopt(d)+",endpoint=server,verify-peer=on", "--tls-creds="+tlsServerID)
		prefix = tlsPrefix
	}
	argv = append(argv, disk)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", 0, "", fmt.Errorf("qemu-nbd: %w: %s", err, strings.TrimSpace(string(out)))
	}
	ep := prefix + "nbd://" + net.JoinHostPort(listen, strconv.Itoa(ports[0])) + "/" + nbdExport
	if r.Handle.Extra == nil {
		r.Handle.Extra = map[string]string{}
	}
	r.Handle.Extra[extraExportEP] = ep
	if err := r.save(); err != nil {
		return "", 0, "", err
	}
	return ep, st.Size(), digest, nil
}

// Unexport ends a cold move's export.
func (b *Backend) Unexport(ctx context.Context, h api.VmHandle) error {
	r, err := b.load(h)
	if err != nil {
		return nil
	}
	b.stopExport(r)
	return nil
}

func (b *Backend) stopExport(r *record) {
	p := r.path(nbdPidFile)
	if pid := readPidfile(p); pid != 0 && cmdlineHas(b.opts.procRoot, pid, r.path(diskFile)) {
		_ = syscall.Kill(pid, syscall.SIGTERM)
	}
	_ = os.Remove(p)
	if _, ok := r.Handle.Extra[extraExportEP]; ok {
		delete(r.Handle.Extra, extraExportEP)
		_ = r.save()
	}
}

func (b *Backend) nbdBinary() string {
	return filepath.Join(filepath.Dir(b.opts.QEMUImg), "qemu-nbd")
}

// copyFrom copies the source's exported overlay into disk and checks it.
func (b *Backend) copyFrom(ctx context.Context, rc backends.Receiving, disk string) error {
	from, tls, err := b.tlsEndpoint(rc.From)
	if err != nil {
		return err
	}
	addr, ok := strings.CutPrefix(from, "nbd://")
	host, port, err := hostPort(strings.TrimSuffix(addr, "/"+nbdExport))
	if !ok || err != nil {
		return fmt.Errorf("the source's export %q is not nbd://host:port/%s", rc.From, nbdExport)
	}
	args := []string{"convert", "-O", "raw"}
	src := "driver=raw,file.driver=nbd,file.host=" + qopt(host) + ",file.port=" + port + ",file.export=" + nbdExport
	if tls {
		args = append(args, "--object", "tls-creds-x509,id="+tlsClientID+",dir="+qopt(b.opts.MigrationTLSDir)+",endpoint=client")
		src += ",file.tls-creds=" + tlsClientID
	}
	args = append(args, "--image-opts", src, disk)
	if err := b.qemuImg(ctx, args...); err != nil {
		return fmt.Errorf("copying the disk from %s: %w", rc.From, err)
	}
	// NBD serves whole sectors: the copy ends in the zeros that round
	// the file up to 512 bytes.
	if st, err := os.Stat(disk); err == nil && st.Size() > rc.FromSize && st.Size()-rc.FromSize < 512 {
		if err := os.Truncate(disk, rc.FromSize); err != nil {
			return err
		}
	}
	st, err := os.Stat(disk)
	if err != nil {
		return err
	}
	got, err := fileDigest(disk)
	if err != nil {
		return err
	}
	if st.Size() != rc.FromSize || got != rc.FromDigest {
		return fmt.Errorf("the copied disk (%d bytes, sha256 %s) is not the source's (%d bytes, sha256 %s)", st.Size(), got, rc.FromSize, rc.FromDigest)
	}
	return nil
}

func fileDigest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

package worker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/events"
)

// A migrate is run by two tasks, one on each host, that never talk to
// each other except through the VM's events (docs/architecture.md,
// "Moving a VM"):
//
//   - live: the target makes a paused copy and reports target_ready
//     (where to send); the source sends disk and memory, then appends the
//     switch (migrated) expecting the VM's last event; the target resumes
//     its copy once it reads the switch; the source removes its own.
//   - cold: the source exports the disk (source_ready); the target copies
//     it and reports target_ready; the source appends the switch.
//
// The switch and its rivals (the migrate's failed result, an engine's
// cancel or forget) are each appended only by a writer that has read
// every event before the one it expects: exactly one is ever stored, and
// each side acts only on what is stored. A side that restarts reads the
// events again and carries on from there.

// Migration settings of a worker (Config.Migration).
type MigrationConfig struct {
	// Listen is this host's address the other hosts reach for migration
	// traffic (the target's endpoints); PortLo..PortHi the ports it
	// takes (default 49152-49215).
	Listen         string
	PortLo, PortHi int
	// Stall: a send that makes no progress for this long is aborted
	// (default 60s); DowntimeMS is the pause at the switch QEMU aims for
	// (default 300); ReadyWait bounds the wait for the other side
	// (default 2m).
	Stall      time.Duration
	DowntimeMS int
	ReadyWait  time.Duration
	// BandwidthBps caps a live send (disk mirror and memory); 0: none.
	BandwidthBps int64
	// SwitchDelay holds the source between the end of a send (the guest
	// paused, all of it on the target) and the append of its switch: a
	// fault test's window onto that moment. 0 in production.
	SwitchDelay time.Duration
}

func (c *MigrationConfig) defaults() {
	if c.Listen == "" {
		c.Listen = "127.0.0.1"
	}
	if c.PortLo == 0 {
		c.PortLo, c.PortHi = 49152, 49215
	}
	if c.Stall == 0 {
		c.Stall = 60 * time.Second
	}
	if c.DowntimeMS == 0 {
		c.DowntimeMS = 300
	}
	if c.ReadyWait == 0 {
		c.ReadyWait = 2 * time.Minute
	}
}

// PhaseTargetFailed: the target could not make its copy (its Error says
// why); the source fails the migrate.
const phaseTargetFailed = "target_failed"

// news is what a VM's events since a sequence say about one migrate.
type news struct {
	last     uint64     // the VM's last event read
	result   *api.Event // the migrate's result, from its source or an engine
	rival    *api.Event // an engine's cancel or forget that abandons it
	ready    *api.Event // the target's copy waits
	exported *api.Event // cold: the source's export
	refused  *api.Event // the target could not make its copy
	// switching: the source reported the switchover (its guest paused),
	// or a copy 90% done: the switch may come any moment.
	switching bool
}

// over reports whether the migrate has ended (its result or a rival is stored).
func (n *news) over() bool { return n.result != nil || n.rival != nil }

// switched reports whether the switch is stored.
func (n *news) switched() bool {
	return n.result != nil && n.result.Type == api.TypeMigrated
}

// read folds the VM's events after n.last into n, trusting each kind of
// news only from its writer: results from the source or an engine,
// phases from the side that has them, cancels and forgets from engines.
func (w *Worker) read(ctx context.Context, t *events.Task, n *news) error {
	evs, err := w.store.ReadVM(ctx, t.VM, n.last+1)
	if err != nil {
		return err
	}
	m := t.Migration
	for _, s := range evs {
		n.last = max(n.last, s.Seq)
		ev := s.Event
		if ev == nil {
			continue
		}
		if ev.Type == api.TypeAccepted && ev.FromEngine() &&
			slices.ContainsFunc(ev.Abandoned, func(a api.Abandoned) bool { return a.CommandID == t.CommandID }) {
			n.rival = ev
			continue
		}
		if ev.CommandID != t.CommandID {
			continue
		}
		switch {
		case ev.Type.IsResult() && (ev.FromEngine() || ev.Writer == m.From):
			n.result = ev
		case ev.Type == api.TypeMigration && ev.Migration != nil:
			switch {
			case ev.Migration.Phase == api.PhaseTargetReady && ev.Writer == m.To:
				n.ready = ev
			case ev.Migration.Phase == phaseTargetFailed && ev.Writer == m.To:
				n.refused = ev
			case ev.Migration.Phase == api.PhaseSourceReady && ev.Writer == m.From:
				n.exported = ev
			case ev.Migration.Phase == api.PhaseSwitchover && ev.Writer == m.From:
				n.switching = true
			case ev.Migration.Phase == api.PhaseCopying && ev.Writer == m.From && ev.Migration.Total > 0:
				// Near the end of the copy the switch may come any moment.
				if ev.Migration.Bytes*10 >= ev.Migration.Total*9 {
					n.switching = true
				}
			}
		}
	}
	return nil
}

// migrate runs this host's side of a migrate task and acks it once that
// side is done (and the migrate over); a step that fails on I/O is
// retried by redelivery, from what is stored.
func (w *Worker) migrate(msg jetstream.Msg, t *events.Task, log *slog.Logger) {
	if t.Migration == nil || t.Handle == nil || t.Handle.Spec == nil {
		log.Error("migrate task without its migration, handle or spec; dropping it")
		_ = msg.Term()
		return
	}
	log = log.With("role", t.Migration.Role, "from", t.Migration.From, "to", t.Migration.To, "mode", t.Migration.Mode)
	stop := w.progress(msg)
	defer stop()
	mig, ok := w.cfg.Router.Migrator(t.Backend)
	var err error
	switch {
	case !ok:
		err = w.refuse(t, mig, fmt.Errorf("backend %s on host %s cannot migrate", t.Backend, w.cfg.Host), log)
	case t.Migration.Role == api.RoleSource:
		err = w.migrateOut(t, mig, log)
	case t.Migration.Role == api.RoleTarget:
		err = w.migrateIn(t, mig, log)
	default:
		log.Error("migrate task with an unknown role; dropping it")
		_ = msg.Term()
		return
	}
	if w.killCtx.Err() != nil {
		return
	}
	if err != nil {
		log.Warn("migration step failed; retrying", "err", err)
		_ = msg.NakWithDelay(2 * time.Second)
		return
	}
	_ = msg.Ack()
}

// refuse ends a side that cannot take part: the source fails the
// migrate, the target reports it cannot make its copy.
func (w *Worker) refuse(t *events.Task, mig backends.Migrator, why error, log *slog.Logger) error {
	if t.Migration.Role == api.RoleSource {
		n := &news{last: t.AcceptedSeq}
		if err := w.read(w.killCtx, t, n); err != nil {
			return err
		}
		return w.fail(t, mig, n, why, log)
	}
	return w.report(t, phaseTargetFailed, &api.Event{Error: why.Error()}, "0")
}

// report appends a migration event of phase for t; extra's handle,
// error and migration fields are copied in.
func (w *Worker) report(t *events.Task, phase string, extra *api.Event, attempt string) error {
	m := t.Migration.Clone()
	m.Role = ""
	if extra.Migration != nil {
		x := extra.Migration
		m.Endpoint, m.Digest, m.DiskDigest, m.Bytes, m.Total = x.Endpoint, x.Digest, x.DiskDigest, x.Bytes, x.Total
	}
	m.Phase = phase
	ev := &api.Event{
		Type: api.TypeMigration, VM: t.VM, CommandID: t.CommandID, Action: t.Action, Time: time.Now().UTC(),
		Host: w.cfg.Host, Handle: extra.Handle, Error: extra.Error, AcceptedSeq: t.AcceptedSeq, Migration: m,
	}
	ctx, cancel := context.WithTimeout(w.killCtx, 10*time.Second)
	defer cancel()
	_, _, err := w.store.Append(ctx, ev, events.NoExpect, api.MigrationMsgID(t.VM, t.CommandID, phase, attempt))
	return err
}

// wait reads the VM's events until cond holds, the migrate is over, or
// within passes (0: no bound); false if it timed out.
func (w *Worker) wait(ctx context.Context, t *events.Task, n *news, within time.Duration, every time.Duration, cond func() bool) (bool, error) {
	var deadline time.Time
	if within > 0 {
		deadline = time.Now().Add(within)
	}
	for {
		if err := w.read(ctx, t, n); err != nil {
			return false, err
		}
		if n.over() || cond() {
			return true, nil
		}
		if !deadline.IsZero() && time.Now().After(deadline) {
			return false, nil
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(every):
		}
	}
}

// migrateOut is the source's side.
func (w *Worker) migrateOut(t *events.Task, mig backends.Migrator, log *slog.Logger) error {
	ctx := w.killCtx
	mc := w.cfg.Migration
	n := &news{last: t.AcceptedSeq}
	h := w.handleFor(t)
	if err := w.read(ctx, t, n); err != nil {
		return err
	}
	if n.over() {
		return w.finishOut(t, mig, h, n, log)
	}
	mine, err := w.baseDigest(h.Spec.ImagePath)
	if err != nil {
		return w.fail(t, mig, n, fmt.Errorf("reading the base image %s: %w", h.Spec.ImagePath, err), log)
	}
	if t.Migration.Mode == api.MigrateCold {
		ep, size, digest, err := mig.Export(ctx, h, backends.Receiving{Listen: mc.Listen, PortLo: mc.PortLo, PortHi: mc.PortHi})
		if err != nil {
			return w.fail(t, mig, n, fmt.Errorf("exporting the disk: %w", err), log)
		}
		if err := w.report(t, api.PhaseSourceReady, &api.Event{Migration: &api.Migration{Endpoint: ep, Total: size, Digest: mine, DiskDigest: digest}}, h.ID); err != nil {
			return err
		}
	}
	ok, err := w.wait(ctx, t, n, mc.ReadyWait, 200*time.Millisecond, func() bool { return n.ready != nil || n.refused != nil })
	if err != nil {
		return err
	}
	switch {
	case n.over():
		return w.finishOut(t, mig, h, n, log)
	case !ok:
		return w.fail(t, mig, n, fmt.Errorf("host %s did not make its copy within %s", t.Migration.To, mc.ReadyWait), log)
	case n.refused != nil:
		return w.fail(t, mig, n, fmt.Errorf("host %s cannot take it: %s", t.Migration.To, n.refused.Error), log)
	case n.ready.Handle == nil:
		return w.fail(t, mig, n, fmt.Errorf("host %s reported its copy without a handle", t.Migration.To), log)
	}
	if t.Migration.Mode == api.MigrateCold {
		_ = mig.Unexport(ctx, h)
	}
	var sent backends.MigrationProgress
	if t.Migration.Mode == api.MigrateLive {
		if d := n.ready.Migration.Digest; d != mine {
			return w.fail(t, mig, n, fmt.Errorf("the base image differs on host %s (sha256 %s there, %s here)", t.Migration.To, short(d), short(mine)), log)
		}
		log.Info("sending the vm", "endpoint", n.ready.Migration.Endpoint)
		if sent, err = w.send(t, mig, h, n, log); err != nil {
			if n.over() {
				return w.finishOut(t, mig, h, n, log)
			}
			return w.fail(t, mig, n, err, log)
		}
	}
	if t.Migration.Mode == api.MigrateLive {
		// The guest is paused here and wholly there: the switch is next.
		// The report goes alongside the switch, adding nothing to the
		// guest's pause (a fault test's SwitchDelay holds the switch
		// after it instead).
		sw := &api.Event{Migration: &api.Migration{Bytes: sent.Bytes, Total: sent.Total}}
		if mc.SwitchDelay > 0 {
			_ = w.report(t, api.PhaseSwitchover, sw, h.ID)
			time.Sleep(mc.SwitchDelay)
		} else {
			go func() { _ = w.report(t, api.PhaseSwitchover, sw, h.ID) }()
		}
	}
	m := t.Migration.Clone()
	m.Role, m.Bytes, m.Total, m.DowntimeMS = "", sent.Bytes, sent.Total, sent.DowntimeMS
	sw := &api.Event{
		Type: api.TypeMigrated, VM: t.VM, CommandID: t.CommandID, Action: t.Action, Time: time.Now().UTC(),
		Host: t.Migration.To, State: t.Migration.Before, Handle: n.ready.Handle, AcceptedSeq: t.AcceptedSeq, Migration: m,
	}
	stored, err := w.appendOutcome(t, sw, n)
	if err != nil {
		return err
	}
	if !stored {
		log.Info("the migration ended otherwise before its switch was stored")
	}
	return w.finishOut(t, mig, h, n, log)
}

// send runs the live send, ending it if the migrate is over meanwhile (a
// cancel), and reports progress at most once a second.
func (w *Worker) send(t *events.Task, mig backends.Migrator, h api.VmHandle, n *news, log *slog.Logger) (backends.MigrationProgress, error) {
	mc := w.cfg.Migration
	sctx, cancel := context.WithCancel(w.killCtx)
	defer cancel()
	if t.TimeoutS > 0 {
		// The migrate's timeout_s bounds the whole send.
		var tcancel context.CancelFunc
		sctx, tcancel = context.WithTimeout(sctx, time.Duration(t.TimeoutS)*time.Second)
		defer tcancel()
	}
	var mu sync.Mutex
	watched := &news{last: n.last}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for sctx.Err() == nil {
			select {
			case <-sctx.Done():
				return
			case <-time.After(500 * time.Millisecond):
			}
			mu.Lock()
			err := w.read(sctx, t, watched)
			over := watched.over()
			mu.Unlock()
			if err == nil && over {
				log.Info("the migration was ended while sending; stopping")
				cancel()
				return
			}
		}
	}()
	var reported time.Time
	count := 0
	p, err := mig.Send(sctx, h, n.ready.Migration.Endpoint, backends.SendOptions{Stall: mc.Stall, DowntimeMS: mc.DowntimeMS, BandwidthBps: mc.BandwidthBps}, func(p backends.MigrationProgress) {
		if time.Since(reported) < time.Second {
			return
		}
		reported = time.Now()
		count++
		_ = w.report(t, api.PhaseCopying, &api.Event{Migration: &api.Migration{Bytes: p.Bytes, Total: p.Total}}, h.ID+"-"+strconv.Itoa(count))
	})
	timedOut := errors.Is(sctx.Err(), context.DeadlineExceeded)
	cancel()
	<-done
	mu.Lock()
	if watched.over() {
		n.result, n.rival = watched.result, watched.rival
	}
	mu.Unlock()
	if err != nil && timedOut {
		err = fmt.Errorf("not done within the migrate's timeout_s (%d s): %w", t.TimeoutS, err)
	}
	return p, err
}

// fail stores the migrate's failed result (unless another outcome won)
// and recovers the source.
func (w *Worker) fail(t *events.Task, mig backends.Migrator, n *news, why error, log *slog.Logger) error {
	log.Warn("migration failed", "err", why)
	m := t.Migration.Clone()
	m.Role = ""
	h := w.handleFor(t)
	ev := &api.Event{
		Type: api.TypeFailed, VM: t.VM, CommandID: t.CommandID, Action: t.Action, Time: time.Now().UTC(),
		Host: w.cfg.Host, State: t.Migration.Before, Handle: &h, AcceptedSeq: t.AcceptedSeq, Migration: m,
		Error: fmt.Sprintf("migrate vm %s from host %s to %s: %v; the vm stays on host %s", t.VM, t.Migration.From, t.Migration.To, why, t.Migration.From),
	}
	if _, err := w.appendOutcome(t, ev, n); err != nil {
		return err
	}
	return w.finishOut(t, mig, h, n, log)
}

// appendOutcome appends the migrate's result ev (the switch, or its
// failure) expecting the VM's last event to be n.last: stored only if
// nothing was appended since that ended the migrate otherwise. On a
// conflict it reads what was appended and tries again unless the migrate
// is over. It reports whether ev is what is stored; n then holds the
// outcome either way.
func (w *Worker) appendOutcome(t *events.Task, ev *api.Event, n *news) (bool, error) {
	ctx := w.killCtx
	for attempt := 0; ; attempt++ {
		if err := w.read(ctx, t, n); err != nil {
			return false, err
		}
		if n.over() {
			return n.result != nil && n.result.Type == ev.Type && n.result.Writer == w.cfg.Host, nil
		}
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		seq, dup, err := w.store.Append(actx, ev, n.last, api.ResultMsgID(t.VM, t.CommandID))
		cancel()
		switch {
		case err == nil && !dup:
			stored := *ev
			stored.Writer = w.cfg.Host
			n.result, n.last = &stored, seq
			return true, nil
		case err == nil:
			continue // a result with its message id is stored: read it
		case errors.Is(err, events.ErrConflict):
			continue
		case ctx.Err() != nil:
			return false, ctx.Err()
		}
		if attempt > 50 {
			return false, err
		}
		time.Sleep(min(time.Duration(attempt+1)*200*time.Millisecond, 2*time.Second))
	}
}

// finishOut carries out on the source what is stored: after the switch,
// its copy is removed; after a failure or a cancel, the guest is
// recovered (resumed if it was running).
func (w *Worker) finishOut(t *events.Task, mig backends.Migrator, h api.VmHandle, n *news, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(w.killCtx, w.cfg.DefaultStopTimeout+2*time.Minute)
	defer cancel()
	if n.switched() {
		if err := w.cfg.Router.Destroy(ctx, h); err != nil && !errors.Is(err, backends.ErrNotFound) {
			return fmt.Errorf("removing the source's copy after the switch: %w", err)
		}
		w.mu.Lock()
		delete(w.vms, t.VM)
		w.mu.Unlock()
		log.Info("migrated; the source's copy is removed")
		return nil
	}
	if t.Migration.Mode == api.MigrateCold {
		_ = mig.Unexport(ctx, h)
	}
	h2, err := mig.Recover(ctx, h, t.Migration.Before)
	if err != nil {
		return fmt.Errorf("recovering the vm on the source: %w", err)
	}
	w.note(&api.Event{Type: api.TypeMigration, VM: t.VM, Handle: &h2, State: t.Migration.Before})
	log.Info("migration over without a switch; the vm stays here")
	return nil
}

// migrateIn is the target's side.
func (w *Worker) migrateIn(t *events.Task, mig backends.Migrator, log *slog.Logger) error {
	ctx := w.killCtx
	n := &news{last: t.AcceptedSeq}
	if err := w.read(ctx, t, n); err != nil {
		return err
	}
	if !n.over() && n.ready == nil && n.refused == nil {
		if t.Migration.Mode == api.MigrateCold {
			if _, err := w.wait(ctx, t, n, 0, 200*time.Millisecond, func() bool { return n.exported != nil }); err != nil {
				return err
			}
		}
		if !n.over() {
			if err := w.receive(t, mig, n, log); err != nil {
				return err
			}
		}
	}
	// The copy waits for the outcome, however long the source takes
	// (a cancel, or a forget of a lost source, ends it too); once the
	// source reports the switchover the guest is paused, so it looks
	// often (each look is one direct get).
	for !n.over() {
		every := 100 * time.Millisecond
		if n.switching {
			every = 5 * time.Millisecond
		}
		if _, err := w.wait(ctx, t, n, every, every, func() bool { return n.switching && every > 5*time.Millisecond }); err != nil {
			return err
		}
	}
	actx, cancel := context.WithTimeout(ctx, w.cfg.CallTimeout)
	defer cancel()
	if n.switched() && n.result.Migration != nil && n.result.Migration.To == w.cfg.Host && n.result.Handle != nil {
		h, err := mig.Activate(actx, *n.result.Handle, t.Migration.Before)
		if err != nil {
			// The switch is stored: the vm is this host's whatever happens
			// here; a copy that cannot run is reported as exited.
			log.Error("activating the migrated copy failed", "err", err)
			w.emitExit(ctx, backends.Exit{Handle: *n.result.Handle, Reason: "the migrated copy did not resume: " + err.Error()})
			return nil
		}
		w.note(&api.Event{Type: api.TypeMigration, VM: t.VM, Handle: &h, State: t.Migration.Before})
		log.Info("migrated here; the vm runs on this host now", "handle_id", h.ID)
		return nil
	}
	src := *t.Handle
	if n.ready != nil && n.ready.Handle != nil {
		src = *n.ready.Handle
	}
	if err := mig.Abandon(actx, src); err != nil {
		return fmt.Errorf("removing the abandoned copy: %w", err)
	}
	log.Info("migration over without a switch; the copy here is removed")
	return nil
}

// receive makes the target's copy and reports it ready (or refused).
func (w *Worker) receive(t *events.Task, mig backends.Migrator, n *news, log *slog.Logger) error {
	ctx := w.killCtx
	mc := w.cfg.Migration
	spec := *t.Handle.Spec
	if t.Spec != nil {
		spec.Image, spec.ImagePath = t.Spec.Image, t.Spec.ImagePath
	}
	var base string
	var err error
	switch {
	case spec.Image != "":
		base, err = w.namedImage(spec)
	case spec.ImagePath != "":
		base, err = w.checkImage(spec.ImagePath)
	}
	if err != nil {
		return w.report(t, phaseTargetFailed, &api.Event{Error: err.Error()}, "base")
	}
	digest, err := w.baseDigest(base)
	if err != nil {
		return w.report(t, phaseTargetFailed, &api.Event{Error: fmt.Sprintf("reading the base image %s: %v", base, err)}, "base")
	}
	r := backends.Receiving{Mode: t.Migration.Mode, Listen: mc.Listen, PortLo: mc.PortLo, PortHi: mc.PortHi}
	if t.Migration.Mode == api.MigrateCold {
		x := n.exported.Migration
		if x.Digest != digest {
			return w.report(t, phaseTargetFailed, &api.Event{Error: fmt.Sprintf("the base image differs on host %s (sha256 %s here, %s there)", w.cfg.Host, short(digest), short(x.Digest))}, "base")
		}
		r.From, r.FromSize, r.FromDigest = x.Endpoint, x.Total, x.DiskDigest
	}
	src := t.Handle.Clone()
	spec.Image, spec.ImagePath = "", base
	src.Spec = &spec
	rctx, cancel := context.WithTimeout(ctx, w.cfg.CallTimeout)
	h, ep, err := mig.Receive(rctx, src, base, r)
	cancel()
	if err != nil {
		log.Warn("cannot make the copy", "err", err)
		return w.report(t, phaseTargetFailed, &api.Event{Error: fmt.Sprintf("making the copy on host %s: %v", w.cfg.Host, err)}, "receive")
	}
	h.Host = w.cfg.Host
	log.Info("the copy waits", "endpoint", ep, "handle_id", h.ID)
	return w.report(t, api.PhaseTargetReady, &api.Event{Handle: &h, Migration: &api.Migration{Endpoint: ep, Digest: digest}}, h.ID)
}

// baseDigest is the sha256 of a base image file, remembered by path,
// size and modification time.
func (w *Worker) baseDigest(path string) (string, error) {
	if path == "" {
		return "", nil // a VM without a base image (Noop)
	}
	st, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	key := fmt.Sprintf("%s|%d|%d", path, st.Size(), st.ModTime().UnixNano())
	w.mu.Lock()
	d, ok := w.digests[key]
	w.mu.Unlock()
	if ok {
		return d, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	hs := sha256.New()
	if _, err := io.Copy(hs, f); err != nil {
		return "", err
	}
	d = hex.EncodeToString(hs.Sum(nil))
	w.mu.Lock()
	if len(w.digests) > 256 {
		clear(w.digests)
	}
	w.digests[key] = d
	w.mu.Unlock()
	return d, nil
}

func short(d string) string {
	if len(d) > 12 {
		return d[:12]
	}
	return d
}

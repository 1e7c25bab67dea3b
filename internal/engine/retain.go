package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/projection"
)

// DefaultRetainDestroyed is how long a destroyed VM's record and events
// are kept before the engines purge them (--retain-destroyed).
const DefaultRetainDestroyed = 7 * 24 * time.Hour

// runRetention purges, every little while, the VMs destroyed longer ago
// than Config.RetainDestroyed. Each purge is decided like a command, on
// the VM's executor (after the VM's commands in progress here) and
// appended expecting the VM's last event (so it loses to any command
// another engine decides meanwhile, which it then sees): a VM that is
// prepared again in the meantime is not purged. Its command id is
// derived from the destroyed record's last event, so engines that
// retire the same VM at once store one decision (the message id) and
// the others' appends fail. It has no issuer: the engines may purge any
// VM.
func (e *Engine) runRetention(ctx context.Context) error {
	keep := e.cfg.RetainDestroyed
	every := min(max(keep/4, 250*time.Millisecond), time.Minute)
	t := time.NewTicker(every)
	defer t.Stop()
	var unfinished unfinishedPurges
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		recs, err := projection.Load(ctx, e.cfg.JS, e.cfg.Names)
		if err != nil {
			if ctx.Err() == nil {
				e.log.Warn("retention: reading the records failed; trying again later", "err", err)
			}
			continue
		}
		// Purges decided by an earlier look whose removal of the VM's
		// events failed: their records are gone, so no look would find
		// them again.
		for name, u := range unfinished.take() {
			e.exec.Do(name, func() {
				if err := e.follow(ctx, u.ev, u.seq); err != nil && ctx.Err() == nil {
					e.log.Warn("retention: removing a purged vm's events failed; trying again later", "vm", name, "err", err)
					unfinished.add(name, u)
				}
			})
		}
		now := time.Now()
		var due []*api.VmRecord
		for _, r := range recs {
			if retired(r, now, keep) {
				due = append(due, r)
			}
		}
		// The longest destroyed first, a batch at a time: the next look
		// comes once this batch is decided, so a backlog (the first run
		// over a bucket of old records) never piles up behind the
		// commands on the executor.
		slices.SortFunc(due, func(a, b *api.VmRecord) int { return a.UpdatedAt.Compare(b.UpdatedAt) })
		var batch sync.WaitGroup
		for _, r := range due[:min(len(due), retainBatch)] {
			if ctx.Err() != nil {
				break
			}
			batch.Add(1)
			e.exec.Do(r.Name, func() {
				defer batch.Done()
				err := e.retire(ctx, r.Name, now)
				var u *unfinishedPurge
				if errors.As(err, &u) {
					unfinished.add(r.Name, *u)
				}
				if err != nil && ctx.Err() == nil {
					e.log.Warn("retention: purging a destroyed vm failed; trying again later", "vm", r.Name, "err", err)
				}
			})
		}
		batch.Wait()
	}
}

// retainBatch bounds the purges one look of the retention decides.
const retainBatch = 1024

// retired reports whether a record is of a VM destroyed longer ago than
// keep (by its last event), with nothing in flight.
func retired(r *api.VmRecord, now time.Time, keep time.Duration) bool {
	return r.Destroyed() && len(r.InFlight) == 0 && !r.UpdatedAt.IsZero() && now.Sub(r.UpdatedAt) >= keep
}

// retire decides the purge of a VM the retention found destroyed, on the
// VM's own record (which may have moved on since it was listed).
func (e *Engine) retire(ctx context.Context, name string, now time.Time) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	var atLeast uint64
	for attempt := 0; attempt < maxConflicts; attempt++ {
		rec, err := e.state(ctx, name, atLeast)
		if err != nil {
			return err
		}
		if !retired(rec, now, e.cfg.RetainDestroyed) {
			return nil // prepared again, or purged, meanwhile
		}
		ev := api.Event{
			VM: name, CommandID: fmt.Sprintf("retain-%d", rec.LastSeq), Action: fsm.ActPurge, Time: time.Now().UTC(),
			Reason: fmt.Sprintf("retention: destroyed at %s, longer ago than --retain-destroyed %s", rec.UpdatedAt.UTC().Format(time.RFC3339), e.cfg.RetainDestroyed),
		}
		if err := admitPurge(rec, &ev); err != nil {
			return nil
		}
		seq, dup, err := e.store.Append(ctx, &ev, rec.LastSeq, api.DecisionMsgID(name, ev.CommandID))
		if errors.Is(err, events.ErrConflict) {
			if atLeast, err = e.store.LastSeq(ctx, name); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		if dup {
			// Another engine retired it first, with the same decision.
			stored, err := e.storedDecision(ctx, name, ev.CommandID, seq)
			if err != nil {
				return err
			}
			if err := e.follow(ctx, stored, seq); err != nil {
				return &unfinishedPurge{ev: stored, seq: seq, err: err}
			}
			return nil
		}
		if err := e.follow(ctx, &ev, seq); err != nil {
			return &unfinishedPurge{ev: &ev, seq: seq, err: err}
		}
		e.cfg.Metrics.Decided(string(fsm.ActPurge), string(ev.Type), ev.Time)
		e.waitFolded(ctx, seq)
		return nil
	}
	return fmt.Errorf("retention: vm %s: %d decisions in a row lost a race", name, maxConflicts)
}

// unfinishedPurge is a purge the retention stored whose removal of the
// VM's earlier events failed (the stream was unavailable): following it
// again repeats the removal, which is idempotent.
type unfinishedPurge struct {
	ev  *api.Event
	seq uint64
	err error
}

func (u *unfinishedPurge) Error() string {
	return fmt.Sprintf("purge of vm %s stored at seq %d, its earlier events not yet removed: %v", u.ev.VM, u.seq, u.err)
}

func (u *unfinishedPurge) Unwrap() error { return u.err }

// unfinishedPurges holds them, by VM, for the retention's next look; at
// most retainBatch (beyond that, a stream that refuses every purge for
// long leaves the rest to the next engine's start-up, finishPurges).
type unfinishedPurges struct {
	mu sync.Mutex
	m  map[string]unfinishedPurge
}

func (p *unfinishedPurges) add(name string, u unfinishedPurge) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = map[string]unfinishedPurge{}
	}
	if len(p.m) < retainBatch {
		p.m[name] = u
	}
}

func (p *unfinishedPurges) take() map[string]unfinishedPurge {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := p.m
	p.m = nil
	return m
}

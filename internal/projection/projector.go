package projection

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/vm"
)

// Projector keeps the VM_RECORDS bucket up to date with the event stream.
// Each engine runs its own, on an ordered consumer, so events are folded
// strictly in stream order (a durable consumer redelivers unacked messages
// after newer ones, which would fold a VM's events out of order). Where it
// got to is kept in a checkpoint file; after a restart it resumes there.
// Several projectors write the same bucket safely: a record only ever
// moves forward (compare-and-set on the KV revision, and records carry the
// last sequence they folded).
type Projector struct {
	JS    jetstream.JetStream
	Names events.Names
	// Checkpoint is the file holding the last folded stream sequence ("":
	// start from the beginning each time, which is correct, only slower).
	Checkpoint string
	Log        *slog.Logger

	kv    jetstream.KeyValue
	mu    sync.Mutex
	cache map[string]*cached
	// applied is the stream sequence of the last event written.
	applied uint64
	saved   uint64
}

type cached struct {
	rec *VmRecord
	rev uint64 // KV revision of rec, 0 if not stored
}

// Run folds events until ctx ends.
func (p *Projector) Run(ctx context.Context) error {
	p.cache = map[string]*cached{}
	kv, err := p.JS.KeyValue(ctx, p.Names.RecordsBucket())
	if err != nil {
		return fmt.Errorf("projection: opening bucket: %w", err)
	}
	p.kv = kv
	p.applied = p.loadCheckpoint()
	p.saved = p.applied
	defer p.saveCheckpoint()
	for ctx.Err() == nil {
		if err := p.consume(ctx, p.Applied()+1); err != nil && ctx.Err() == nil {
			p.Log.Warn("projection: consumer ended; resuming", "from", p.Applied()+1, "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(250 * time.Millisecond):
			}
		}
	}
	return nil
}

func (p *Projector) consume(ctx context.Context, from uint64) error {
	st, err := p.JS.Stream(ctx, p.Names.EventsStream())
	if err != nil {
		return err
	}
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:   from,
	})
	if err != nil {
		return err
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(1000))
	if err != nil {
		return err
	}
	defer it.Stop()
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	lastSave := time.Now()
	for {
		msg, err := it.Next()
		if err != nil {
			return err
		}
		md, err := msg.Metadata()
		if err != nil {
			continue
		}
		if err := p.applyWithRetry(ctx, msg.Subject(), msg.Data(), md.Sequence.Stream); err != nil {
			return err
		}
		if md.NumPending == 0 || time.Since(lastSave) > time.Second {
			p.saveCheckpoint()
			lastSave = time.Now()
		}
	}
}

func (p *Projector) loadCheckpoint() uint64 {
	if p.Checkpoint == "" {
		return 0
	}
	b, err := os.ReadFile(p.Checkpoint)
	if err != nil {
		return 0
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0
	}
	return n
}

func (p *Projector) saveCheckpoint() {
	seq := p.Applied()
	if p.Checkpoint == "" || seq == p.saved {
		return
	}
	tmp := p.Checkpoint + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.FormatUint(seq, 10)+"\n"), 0o644); err == nil {
		if os.Rename(tmp, p.Checkpoint) == nil {
			p.saved = seq
		}
	}
}

func (p *Projector) applyWithRetry(ctx context.Context, subj string, data []byte, seq uint64) error {
	backoff := 50 * time.Millisecond
	for {
		err := p.apply(ctx, subj, data, seq)
		if err == nil {
			return nil
		}
		p.Log.Warn("projection: writing record failed, retrying", "seq", seq, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

func (p *Projector) apply(ctx context.Context, subj string, data []byte, seq uint64) error {
	name, _, ok := p.Names.ParseEventSubject(subj)
	if !ok || vm.ValidateName(name) != nil {
		p.markApplied(seq)
		return nil
	}
	ev, err := events.Decode(data)
	if err != nil || ev.VM != name {
		// Not an event vmherd wrote; it still moves the VM's sequence on.
		ev = nil
	}
	p.mu.Lock()
	var c *cached
	if old := p.cache[name]; old != nil {
		cp := *old // written back whole under the lock by store
		c = &cp
	}
	p.mu.Unlock()
	if c == nil {
		c = &cached{}
		if e, err := p.kv.Get(ctx, name); err == nil {
			if r, err := Unmarshal(e.Value()); err == nil {
				c.rec, c.rev = r, e.Revision()
			}
		} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
			return err
		}
	}
	var next *VmRecord
	if ev == nil {
		next = c.rec
		if next != nil && seq > next.LastSeq {
			next = next.Clone()
			next.LastSeq = seq
		}
	} else {
		next = Fold(c.rec, ev, seq)
	}
	if next == c.rec || next == nil || !next.Exists() && c.rev == 0 {
		// Nothing to write: already applied, or a name that never existed.
		c.rec = next
		p.store(name, c)
		p.markApplied(seq)
		return nil
	}
	rev, err := p.write(ctx, name, next, c.rev)
	if err != nil {
		if !isCASConflict(err) {
			return err
		}
		// Another projector (or a rebuild) wrote this key: take its record
		// if it is ahead, else write ours over it.
		e, gerr := p.kv.Get(ctx, name)
		switch {
		case errors.Is(gerr, jetstream.ErrKeyNotFound):
			rev, err = p.write(ctx, name, next, 0)
		case gerr != nil:
			return gerr
		default:
			theirs, uerr := Unmarshal(e.Value())
			if uerr == nil && theirs.LastSeq >= seq {
				c.rec, c.rev = theirs, e.Revision()
				p.store(name, c)
				p.markApplied(seq)
				return nil
			}
			rev, err = p.write(ctx, name, next, e.Revision())
		}
		if err != nil {
			p.forget(name)
			return err
		}
	}
	c.rec, c.rev = next, rev
	p.store(name, c)
	p.markApplied(seq)
	return nil
}

func (p *Projector) write(ctx context.Context, name string, r *VmRecord, rev uint64) (uint64, error) {
	if rev == 0 {
		return p.kv.Create(ctx, name, r.Marshal())
	}
	return p.kv.Update(ctx, name, r.Marshal(), rev)
}

func isCASConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyExists) || events.IsConflict(err)
}

func (p *Projector) store(name string, c *cached) {
	p.mu.Lock()
	p.cache[name] = c
	p.mu.Unlock()
}

func (p *Projector) forget(name string) {
	p.mu.Lock()
	delete(p.cache, name)
	p.mu.Unlock()
}

func (p *Projector) markApplied(seq uint64) {
	p.mu.Lock()
	if seq > p.applied {
		p.applied = seq
	}
	p.mu.Unlock()
}

// Applied returns the stream sequence of the last event this projector folded.
func (p *Projector) Applied() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.applied
}

// Record returns the projector's view of a VM, if it has one cached.
func (p *Projector) Record(name string) *VmRecord {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c := p.cache[name]; c != nil {
		return c.rec.Clone()
	}
	return nil
}

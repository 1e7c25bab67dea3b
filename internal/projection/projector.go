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

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
)

// JetStream is what a Projector needs of a JetStream context (a
// jetstream.JetStream has it all): the events stream to read, the records
// bucket, pipelined publishes of record writes, and the options that name
// their subject (events.KVPutSubject).
type JetStream interface {
	Stream(ctx context.Context, name string) (jetstream.Stream, error)
	KeyValue(ctx context.Context, bucket string) (jetstream.KeyValue, error)
	PublishMsgAsync(msg *nats.Msg, opts ...jetstream.PublishOpt) (jetstream.PubAckFuture, error)
	Options() jetstream.JetStreamOptions
}

// Projector keeps the VM_RECORDS bucket up to date with the event stream.
// Each engine runs its own, on an ordered consumer, so events are folded
// strictly in stream order (a durable consumer redelivers unacked messages
// after newer ones, which would fold a VM's events out of order). Where it
// got to is kept in a checkpoint file; after a restart it resumes there.
// Several projectors write the same bucket safely: a record only ever
// moves forward (compare-and-set on the KV revision, and records carry the
// last sequence they folded).
//
// Folding is sequential; writing is pipelined. Each fold's record is sent
// to the bucket with an asynchronous publish carrying the key's expected
// revision, so the fold loop does not wait a round trip per event. A key
// has at most one write in flight: a fold of a key whose write is still
// unacknowledged only marks it dirty, and the newest record is written when
// the ack comes (a record holds everything folded before it, so the
// in-between ones need not be written). The checkpoint only ever names a
// sequence whose records, and every earlier one's, are acknowledged.
type Projector struct {
	JS    JetStream
	Names api.Names
	// Checkpoint is the file holding the last folded stream sequence ("":
	// start from the beginning each time, which is correct, only slower).
	Checkpoint string
	Log        *slog.Logger
	// MaxInFlight bounds the record writes awaiting their acks (default 1024).
	MaxInFlight int
	// Observe, if set, is called with every new fold of a record, in
	// stream order (never concurrently). It must not block.
	Observe func(*api.VmRecord)
	// MaxCached bounds the VMs whose newest fold the projector keeps
	// (default DefaultMaxCached). Past it, idle ones are forgotten (names
	// that never had a record first): their records are in the bucket,
	// where Get and the next fold find them, and a name without a record
	// costs its next decision one read of its events from the stream.
	MaxCached int
	// Linger delays the write of a transitional record (a command in
	// flight) by up to this long, so that it and its result's settled
	// record are usually written once: one record write per transition
	// instead of two. A settled record is written at once. 0 means
	// DefaultLinger; a negative value writes every fold at once.
	Linger time.Duration

	kv    jetstream.KeyValue
	slots chan struct{} // one per write in flight
	wg    sync.WaitGroup

	mu    sync.Mutex
	cache map[string]*cached
	// order holds the folded sequences whose records are not yet all
	// acknowledged, oldest first; acked marks those that are.
	order []uint64
	acked map[uint64]bool
	// folded is the sequence of the last event folded; applied the last
	// one such that it and every earlier one are stored in the bucket.
	folded  uint64
	applied uint64
	saved   uint64
	// waiters wait for folded to reach their sequence (WaitFolded).
	waiters []waiter
}

type waiter struct {
	seq uint64
	ch  chan struct{}
}

type cached struct {
	rec *api.VmRecord // the newest fold; never modified once here
	rev uint64        // KV revision of the last record written, 0 if none
	// writing: a write is in flight; dirty: rec is newer than it;
	// lingering: a transitional rec waits (Linger) to be written.
	writing, dirty, lingering bool
	// pending are the folded sequences of this key not yet acknowledged.
	pending []uint64
}

// Run folds events until ctx ends.
func (p *Projector) Run(ctx context.Context) error {
	p.mu.Lock()
	p.cache = map[string]*cached{}
	p.acked = map[uint64]bool{}
	p.order = nil
	p.mu.Unlock()
	if p.MaxInFlight <= 0 {
		p.MaxInFlight = 1024
	}
	if p.MaxCached <= 0 {
		p.MaxCached = DefaultMaxCached
	}
	if p.Linger == 0 {
		p.Linger = DefaultLinger
	}
	p.slots = make(chan struct{}, p.MaxInFlight)
	var kv jetstream.KeyValue
	if err := jsetup.RetryStartup(ctx, p.Log, "the records bucket", func(sctx context.Context) (err error) {
		kv, err = p.JS.KeyValue(sctx, p.Names.RecordsBucket())
		return err
	}); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("projection: opening bucket: %w", err)
	}
	p.mu.Lock()
	p.kv = kv
	p.mu.Unlock()
	start := p.loadCheckpoint()
	p.mu.Lock()
	p.folded, p.applied, p.saved = start, start, start
	p.mu.Unlock()
	defer func() {
		p.drain(5 * time.Second)
		p.saveCheckpoint()
	}()
	for ctx.Err() == nil {
		if err := p.consume(ctx, p.Folded()+1); err != nil && ctx.Err() == nil {
			p.Log.Warn("projection: consumer ended; resuming", "from", p.Folded()+1, "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(250 * time.Millisecond):
			}
		}
	}
	return nil
}

// drain waits up to d for the writes in flight.
func (p *Projector) drain(d time.Duration) {
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
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
	it, err := cons.Messages(jetstream.PullMaxMessages(1000), jetstream.PullExpiry(jsetup.PullExpiry), jetstream.PullHeartbeat(jsetup.PullHeartbeat))
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
		data := msg.Data()
		if events.StoredByServer(msg.Headers()) {
			data = nil // not an event: it moves the VM's sequence on, changes nothing
		}
		if err := p.applyWithRetry(ctx, msg.Subject(), data, md.Sequence.Stream); err != nil {
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
		p.Log.Warn("projection: reading record failed, retrying", "seq", seq, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

// apply folds the event at seq and schedules the write of its record.
func (p *Projector) apply(ctx context.Context, subj string, data []byte, seq uint64) error {
	if seq <= p.Folded() {
		return nil // a consumer restart delivers again what was folded
	}
	name, _, _, ok := p.Names.ParseEventSubject(subj)
	p.mu.Lock()
	known := ok && p.cache[name] != nil // only valid names are cached
	p.mu.Unlock()
	if !ok || !known && api.ValidateName(name) != nil {
		p.done(nil, seq)
		return nil
	}
	ev, err := events.DecodeStored(p.Names, subj, data)
	if err != nil {
		// Not an event vmherd wrote; it still moves the VM's sequence on.
		ev = nil
	}
	p.mu.Lock()
	c := p.cache[name]
	p.mu.Unlock()
	if c == nil {
		// Not seen since this projector started: the bucket has it.
		nc := &cached{}
		if e, err := p.kv.Get(ctx, name); err == nil {
			if r, err := api.UnmarshalRecord(e.Value()); err == nil {
				nc.rec, nc.rev = r, e.Revision()
			}
		} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
			return err
		}
		c = nc
		p.mu.Lock()
		p.cache[name] = c
		if len(p.cache) > p.MaxCached {
			p.evict(c)
		}
		p.mu.Unlock()
	}
	p.mu.Lock()
	var next *api.VmRecord
	if ev == nil {
		next = c.rec
		if next != nil && seq > next.LastSeq {
			next = next.Clone()
			next.LastSeq = seq
		}
	} else {
		next = Fold(c.rec, ev, seq)
	}
	if next == c.rec || next == nil || !next.Exists() && c.rev == 0 && !c.writing {
		// Nothing to write: already applied, or a name that never existed.
		c.rec = next
		p.mu.Unlock()
		p.done(nil, seq)
		return nil
	}
	c.rec = next
	p.mu.Unlock()
	if p.Observe != nil {
		p.Observe(next)
	}
	p.done(c, seq)
	return p.schedule(ctx, name, c, false)
}

// DefaultMaxCached is the Projector's default MaxCached: more VMs than a
// fleet's engine usually decides on at once, a few MB of records.
const DefaultMaxCached = 16384

// evict forgets idle cached VMs (no write in flight or lingering, every
// fold stored) until a quarter of MaxCached is free: names without a
// record first (a flood of commands for names that do not exist, VMs
// purged), then any. keep is not evicted. Callers hold p.mu.
func (p *Projector) evict(keep *cached) {
	target := p.MaxCached * 3 / 4
	for _, anyIdle := range []bool{false, true} {
		for name, c := range p.cache {
			if len(p.cache) <= target {
				return
			}
			if c == keep || c.writing || c.lingering || len(c.pending) > 0 {
				continue
			}
			if anyIdle || !c.rec.Exists() {
				delete(p.cache, name)
			}
		}
	}
}

// DefaultLinger is the Projector's default Linger: longer than most
// transitions of a Noop or QEMU VM under load (so their two folds are
// written once), short enough that a transitional state shows in
// VM_RECORDS soon after it begins.
const DefaultLinger = 500 * time.Millisecond

// done records that the event at seq is folded. With c nil, nothing needs
// writing for it; else it is stored once c's next write is acknowledged.
func (p *Projector) done(c *cached, seq uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.folded = seq
	if len(p.waiters) > 0 {
		p.wake()
	}
	if c == nil {
		if len(p.order) == 0 {
			p.applied = seq
			return
		}
		p.acked[seq] = true
	} else {
		c.pending = append(c.pending, seq)
	}
	p.order = append(p.order, seq)
}

// schedule starts a write of c's record unless one is in flight (which
// will write the newest record when its ack comes) or every fold of c is
// written already (no pending sequence: a fold's record and its pending
// sequence are not set under one lock, so the sequences, not the record,
// say what is left to write). A transitional record (a command in flight) waits
// Linger first unless now is set; a settled one is written at once,
// together with any transitional one still waiting.
func (p *Projector) schedule(ctx context.Context, name string, c *cached, now bool) error {
	p.mu.Lock()
	if c.writing {
		c.dirty = true
		p.mu.Unlock()
		return nil
	}
	if len(c.pending) == 0 {
		p.mu.Unlock()
		return nil
	}
	if !now && p.Linger > 0 && len(c.rec.InFlight) > 0 {
		if !c.lingering {
			c.lingering = true
			time.AfterFunc(p.Linger, func() {
				p.mu.Lock()
				c.lingering = false
				p.mu.Unlock()
				if ctx.Err() == nil {
					_ = p.schedule(ctx, name, c, true)
				}
			})
		}
		p.mu.Unlock()
		return nil
	}
	c.writing, c.dirty = true, false
	rec, rev := c.rec, c.rev
	covered := len(c.pending)
	p.mu.Unlock()
	select {
	case p.slots <- struct{}{}:
	case <-ctx.Done():
		p.mu.Lock()
		c.writing = false
		p.mu.Unlock()
		return ctx.Err()
	}
	p.wg.Add(1)
	f, err := p.publish(name, rec, rev)
	if err != nil {
		go p.finish(ctx, name, c, covered, 0, err)
		return nil
	}
	go func() {
		t := time.NewTimer(ackTimeout)
		defer t.Stop()
		select {
		case ack := <-f.Ok():
			p.finish(ctx, name, c, covered, ack.Sequence, nil)
		case err := <-f.Err():
			p.finish(ctx, name, c, covered, 0, err)
		case <-t.C:
			// The ack is lost (a server restart drops them): write again,
			// which finds out whether the first write landed.
			p.finish(ctx, name, c, covered, 0, errAckTimeout)
		}
	}()
	return nil
}

// ackTimeout bounds the wait for a record write's ack.
const ackTimeout = 5 * time.Second

var errAckTimeout = errors.New("no ack for the record write")

// publish sends r as key name's next revision, expecting rev as its last.
// A record of a name that no longer exists (a purge's fold) is sent as
// the key's delete marker: the name leaves the bucket.
func (p *Projector) publish(name string, r *api.VmRecord, rev uint64) (jetstream.PubAckFuture, error) {
	m := nats.NewMsg(events.KVPutSubject(p.JS, p.Names.RecordsBucket(), name))
	if r.Exists() {
		m.Data = r.Marshal()
	} else {
		m.Header.Set(kvOperation, kvDelete)
	}
	return p.JS.PublishMsgAsync(m, jetstream.WithExpectLastSequencePerSubject(rev))
}

// The header and value of a KV delete marker (what jetstream's
// KeyValue.Delete publishes).
const (
	kvOperation = "KV-Operation"
	kvDelete    = "DEL"
)

// finish handles the end of a write of c's record that covered the first
// covered pending sequences of c: it retries a failed write (resolving a
// compare-and-set conflict with whoever else wrote the key), marks the
// covered sequences stored, and writes c's newer record if there is one.
func (p *Projector) finish(ctx context.Context, name string, c *cached, covered int, rev uint64, err error) {
	defer p.wg.Done()
	backoff := 50 * time.Millisecond
	for err != nil {
		if ctx.Err() != nil {
			p.mu.Lock()
			c.writing = false
			p.mu.Unlock()
			<-p.slots
			return
		}
		if isCASConflict(err) {
			rev, covered, err = p.resolve(ctx, name, c)
			continue
		}
		p.Log.Warn("projection: writing record failed, retrying", "vm", name, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
		p.mu.Lock()
		rec, expect := c.rec, c.rev
		covered, c.dirty = len(c.pending), false
		p.mu.Unlock()
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		rev, err = p.write(wctx, name, rec, expect)
		cancel()
	}
	p.mu.Lock()
	c.rev = rev
	for _, s := range c.pending[:covered] {
		p.acked[s] = true
	}
	if c.pending = append(c.pending[:0], c.pending[covered:]...); len(c.pending) == 0 {
		c.pending = nil // most VMs are idle: keep nothing for them
	}
	for len(p.order) > 0 && p.acked[p.order[0]] {
		delete(p.acked, p.order[0])
		p.applied = p.order[0]
		p.order = p.order[1:]
	}
	if len(p.order) == 0 {
		p.order = nil // let the backing array go
	}
	c.writing = false
	again := c.dirty
	p.mu.Unlock()
	<-p.slots // before scheduling again: a full pipeline must not deadlock
	if again {
		_ = p.schedule(ctx, name, c, false)
	}
}

// resolve handles a compare-and-set conflict on name: another projector (or
// a rebuild) wrote it. If their record is at least as far as this one's
// newest fold, it is adopted (folding goes on from it); else this one's
// newest record is written over theirs. It returns the key's revision and
// how many of c's pending sequences that revision covers.
func (p *Projector) resolve(ctx context.Context, name string, c *cached) (uint64, int, error) {
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	p.mu.Lock()
	mine, covered := c.rec, len(c.pending)
	c.dirty = false
	p.mu.Unlock()
	e, err := p.kv.Get(wctx, name)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound) && !mine.Exists():
		return 0, covered, nil // deleted already (a purge): nothing to write
	case errors.Is(err, jetstream.ErrKeyNotFound):
		// Deleted by a projector further on (a purge's fold), or never
		// written. Mine is of a purged incarnation when the VM's latest
		// purge comes after it: a projector that is behind never brings
		// back a purged record (its own fold of the purge, to come,
		// deletes nothing then), even while the purge's removal of the
		// earlier events is pending. Else it is of the name's new
		// incarnation and is written, even if a later event of the VM is
		// stored already: that event's fold comes after it, and a
		// projector that restarts past mine must find it in the bucket.
		st, err := p.JS.Stream(wctx, p.Names.EventsStream())
		if err != nil {
			return 0, 0, err
		}
		pg, purged, err := events.LastPurge(wctx, st, p.Names, name)
		if err != nil {
			return 0, 0, err
		}
		if purged && pg.Seq > mine.LastSeq {
			return 0, covered, nil
		}
		rev, err := p.write(wctx, name, mine, 0)
		return rev, covered, err
	case err != nil:
		return 0, 0, err
	}
	theirs, uerr := api.UnmarshalRecord(e.Value())
	if uerr == nil && theirs.LastSeq >= mine.LastSeq {
		p.mu.Lock()
		if theirs.LastSeq >= c.rec.LastSeq {
			c.rec, covered, c.dirty = theirs, len(c.pending), false
		} else {
			c.dirty = true // folded past theirs meanwhile: write that over theirs
		}
		p.mu.Unlock()
		return e.Revision(), covered, nil
	}
	rev, err := p.write(wctx, name, mine, e.Revision())
	return rev, covered, err
}

func (p *Projector) write(ctx context.Context, name string, r *api.VmRecord, rev uint64) (uint64, error) {
	switch {
	case !r.Exists() && rev == 0:
		return 0, nil // no record to delete
	case !r.Exists():
		if err := p.kv.Delete(ctx, name, jetstream.LastRevision(rev)); err != nil {
			return 0, err
		}
		// The delete marker's revision: read it back for the next write.
		return p.deletedRev(ctx, name)
	case rev == 0:
		return p.kv.Create(ctx, name, r.Marshal())
	}
	return p.kv.Update(ctx, name, r.Marshal(), rev)
}

// deletedRev is the revision of a deleted key's delete marker (0 if the
// key was written again since: the next write finds out by its conflict).
func (p *Projector) deletedRev(ctx context.Context, name string) (uint64, error) {
	st, err := p.JS.Stream(ctx, "KV_"+p.Names.RecordsBucket())
	if err != nil {
		return 0, err
	}
	m, err := st.GetLastMsgForSubject(ctx, "$KV."+p.Names.RecordsBucket()+"."+name)
	if err != nil {
		return 0, err
	}
	if m.Header.Get(kvOperation) != kvDelete {
		return 0, nil
	}
	return m.Sequence, nil
}

func isCASConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyExists) || events.IsConflict(err)
}

// WaitFolded waits until this projector has folded the event at stream
// sequence seq, and so every earlier one, or until ctx ends; it reports
// whether it has.
func (p *Projector) WaitFolded(ctx context.Context, seq uint64) bool {
	p.mu.Lock()
	if p.folded >= seq {
		p.mu.Unlock()
		return true
	}
	w := waiter{seq: seq, ch: make(chan struct{})}
	p.waiters = append(p.waiters, w)
	p.mu.Unlock()
	select {
	case <-w.ch:
		return true
	case <-ctx.Done():
		p.mu.Lock()
		defer p.mu.Unlock()
		for i, o := range p.waiters {
			if o.ch == w.ch {
				p.waiters = append(p.waiters[:i], p.waiters[i+1:]...)
				return false
			}
		}
		return true // woken meanwhile
	}
}

// wake releases the waiters whose sequence is folded. Callers hold p.mu.
func (p *Projector) wake() {
	keep := p.waiters[:0]
	for _, w := range p.waiters {
		if w.seq <= p.folded {
			close(w.ch)
		} else {
			keep = append(keep, w)
		}
	}
	clear(p.waiters[len(keep):])
	p.waiters = keep
}

// Folded returns the stream sequence of the last event this projector folded.
func (p *Projector) Folded() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.folded
}

// Applied returns the stream sequence of the last event whose record, and
// every earlier event's, is stored in the bucket.
func (p *Projector) Applied() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.applied
}

// Get returns the projection's record of a VM: the projector's newest fold
// if it has one, else the record in the bucket (written by this or another
// projector), else nil. It is the engine's decision state: a fold of a
// prefix of the VM's events, checked by the append that follows a decision
// (which expects the VM's last event to be the record's LastSeq).
func (p *Projector) Get(ctx context.Context, name string) (*api.VmRecord, error) {
	p.mu.Lock()
	var rec *api.VmRecord
	if c := p.cache[name]; c != nil {
		rec = c.rec
	}
	kv := p.kv
	p.mu.Unlock()
	if rec != nil {
		return rec, nil
	}
	if kv == nil {
		var err error
		if kv, err = p.JS.KeyValue(ctx, p.Names.RecordsBucket()); err != nil {
			return nil, fmt.Errorf("projection: opening bucket: %w", err)
		}
	}
	e, err := kv.Get(ctx, name)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("projection: reading the record of vm %s: %w", name, err)
	}
	return api.UnmarshalRecord(e.Value())
}

// Seed gives the projector a record folded elsewhere from the stream (the
// engine's catch-up, when the projector's record ended before the VM's
// last event), if it is newer than the projector's own and covers nothing
// the projector has not folded: later folds of the name go on from it.
// A record seeded for a name without a record in the bucket writes
// nothing; one for a name that has a record is written like a fold.
func (p *Projector) Seed(name string, rec *api.VmRecord) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cache == nil || rec.LastSeq > p.folded {
		return
	}
	c := p.cache[name]
	if c == nil {
		c = &cached{rec: rec}
		p.cache[name] = c
		if len(p.cache) > p.MaxCached {
			p.evict(c)
		}
		return
	}
	if c.rec == nil || c.rec.LastSeq < rec.LastSeq {
		c.rec = rec
	}
}

// VMs lists the VMs this projector has folded or been given since it
// started.
func (p *Projector) VMs() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.cache))
	for name := range p.cache {
		out = append(out, name)
	}
	return out
}

// Current returns the projector's newest fold of a VM (possibly not yet
// written to the bucket), nil if it has none cached. The record is shared:
// callers must not modify it (Fold never does; it returns a new record).
func (p *Projector) Current(name string) *api.VmRecord {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c := p.cache[name]; c != nil {
		return c.rec
	}
	return nil
}

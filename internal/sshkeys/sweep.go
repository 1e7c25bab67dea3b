// Package sshkeys deletes what the VM_SSH bucket keeps for a VM (its
// generated private key, its host keys, its provisioning log) once that
// incarnation is destroyed, however it was destroyed: vmctl destroy,
// vmctl down --destroy, a forget, or a bare `nats pub`.
//
// The engines run the Sweeper: they are the only part every destroy
// passes through (its decision and the fold that records its result),
// they may write VM_SSH, and it needs no worker, which may not read it.
// It follows VM_RECORDS, the trusted fold (a destroyed forged by another
// host's worker does not end a record), so only a destroy the record
// counts deletes anything.
package sshkeys

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"

	"github.com/nats-io/nats.go/jetstream"
)

// Whats are the entries VM_SSH keeps per incarnation.
var Whats = []string{api.SSHPrivateKey, api.SSHHostKeys, api.SSHProvisionLog}

// Sweeper deletes a destroyed incarnation's VM_SSH entries.
type Sweeper struct {
	JS    jetstream.JetStream
	Names api.Names
	Log   *slog.Logger
}

// Run sweeps until ctx ends: first every entry whose incarnation the
// records show destroyed or replaced (what was destroyed while no engine
// ran), then each record that becomes destroyed. Failures are logged and
// retried; Run returns only when ctx ends.
func (s *Sweeper) Run(ctx context.Context) error {
	for {
		err := s.run(ctx)
		if ctx.Err() != nil {
			return nil
		}
		s.Log.Warn("sweeping VM_SSH: retrying", "err", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(2 * time.Second):
		}
	}
}

func (s *Sweeper) run(ctx context.Context) error {
	records, err := s.JS.KeyValue(ctx, s.Names.RecordsBucket())
	if err != nil {
		return err
	}
	keys, err := s.JS.KeyValue(ctx, s.Names.SSHBucket())
	if err != nil {
		return err
	}
	// Watch before the pass, so nothing destroyed in between is missed.
	w, err := records.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		return err
	}
	defer func() { _ = w.Stop() }()
	evs, err := s.JS.Stream(ctx, s.Names.EventsStream())
	if err != nil {
		return err
	}
	if err := s.pass(ctx, records, keys, evs); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("the records watch ended")
			}
			if e == nil {
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				// A purge: every incarnation of the name is gone (the next
				// one starts at generation 1 again).
				at, err := s.purgedAt(ctx, evs, e.Key())
				if err != nil {
					return err
				}
				if !at.IsZero() {
					if err := s.sweepBefore(ctx, keys, e.Key(), at); err != nil {
						return err
					}
				}
				continue
			}
			r, err := api.UnmarshalRecord(e.Value())
			if err != nil || !r.Destroyed() {
				continue
			}
			if err := s.sweep(ctx, keys, r.Name, r.Generation); err != nil {
				return err
			}
		}
	}
}

// pass deletes every entry of an incarnation older than the record's, or
// of the record's own when it is destroyed, and of a purged name (its
// record deleted) every entry written before the purge. Entries of a name
// that never had a record, of a later generation, or written after the
// purge are kept: vmctl up makes the key of the incarnation it is about
// to prepare.
func (s *Sweeper) pass(ctx context.Context, records, keys jetstream.KeyValue, evs jetstream.Stream) error {
	lister, err := keys.ListKeys(ctx)
	if err != nil {
		if errors.Is(err, jetstream.ErrNoKeysFound) {
			return nil
		}
		return err
	}
	var all []string
	for k := range lister.Keys() {
		all = append(all, k)
	}
	recs := map[string]*api.VmRecord{}
	purges := map[string]time.Time{} // of names without a record, read once each
	for _, k := range all {
		name, gen, _, ok := api.ParseSSHKey(k)
		if !ok {
			continue
		}
		r, seen := recs[name]
		if !seen {
			e, err := records.Get(ctx, name)
			switch {
			case errors.Is(err, jetstream.ErrKeyNotFound):
			case err != nil:
				return err
			default:
				if r, err = api.UnmarshalRecord(e.Value()); err != nil {
					r = nil
				}
			}
			recs[name] = r
		}
		if r == nil {
			// No record: a name about to be prepared (vmctl up makes its
			// key first) keeps its entries; a purged name loses those
			// written before its purge.
			purgedAt, seen := purges[name]
			if !seen {
				var err error
				if purgedAt, err = s.purgedAt(ctx, evs, name); err != nil {
					return err
				}
				purges[name] = purgedAt
			}
			if !purgedAt.IsZero() {
				if err := s.purgeIfBefore(ctx, keys, k, purgedAt); err != nil {
					return err
				}
			}
			continue
		}
		stale := gen < r.Generation || (gen == r.Generation && r.Destroyed())
		if gen == 0 { // before entries were per incarnation: gone with the VM
			stale = r.Destroyed()
		}
		if stale {
			if err := s.purge(ctx, keys, k); err != nil {
				return err
			}
		}
	}
	return nil
}

// sweep deletes the entries of incarnation gen of name (and those written
// before entries were per incarnation).
func (s *Sweeper) sweep(ctx context.Context, keys jetstream.KeyValue, name string, gen int) error {
	for _, what := range Whats {
		for _, k := range []string{api.SSHKey(name, gen, what), name + "." + what} {
			if err := s.purge(ctx, keys, k); err != nil {
				return err
			}
		}
	}
	return nil
}

// sweepBefore deletes the entries of every incarnation of name written
// before t (its purge): vmctl up may have made the new incarnation's key
// since.
func (s *Sweeper) sweepBefore(ctx context.Context, keys jetstream.KeyValue, name string, t time.Time) error {
	lister, err := keys.ListKeysFiltered(ctx, name+".>")
	if err != nil {
		if errors.Is(err, jetstream.ErrNoKeysFound) {
			return nil
		}
		return err
	}
	var ks []string
	for k := range lister.Keys() {
		ks = append(ks, k)
	}
	for _, k := range ks {
		if n, _, _, ok := api.ParseSSHKey(k); !ok || n != name {
			continue
		}
		if err := s.purgeIfBefore(ctx, keys, k, t); err != nil {
			return err
		}
	}
	return nil
}

// purgeIfBefore purges k if it was written before t.
func (s *Sweeper) purgeIfBefore(ctx context.Context, keys jetstream.KeyValue, k string, t time.Time) error {
	e, err := keys.Get(ctx, k)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if !e.Created().Before(t) {
		return nil
	}
	return s.purge(ctx, keys, k)
}

// purgedAt is when the server stored name's latest purge decision in the
// event stream (zero: none). Entries written before it are the purged
// incarnations'; vmctl up writes the new one's only once it has seen the
// purge, so after it, even when the record's delete marker comes later.
func (s *Sweeper) purgedAt(ctx context.Context, evs jetstream.Stream, name string) (time.Time, error) {
	p, ok, err := events.LastPurge(ctx, evs, s.Names, name)
	if err != nil || !ok {
		return time.Time{}, err
	}
	return p.Time, nil
}

// purge removes k and every revision of it, if it is there (a missing
// key costs a read, not a stored marker).
func (s *Sweeper) purge(ctx context.Context, keys jetstream.KeyValue, k string) error {
	if _, err := keys.Get(ctx, k); err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil
		}
		return err
	}
	// A stream purge filtered on the key's subject: the buckets refuse the
	// rollup a KV purge would be (events.EnsureBucket).
	st, err := s.JS.Stream(ctx, "KV_"+keys.Bucket())
	if err != nil {
		return err
	}
	if err := st.Purge(ctx, jetstream.WithPurgeSubject("$KV."+keys.Bucket()+"."+k)); err != nil {
		return err
	}
	s.Log.Info("deleted a destroyed VM's ssh entry", "key", k)
	return nil
}

package events

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrConflict means another writer appended to the VM's events since the
// sequence the caller expected: re-read and decide again.
var ErrConflict = errors.New("vm events changed concurrently")

// StoreJS is what a Store needs of a JetStream context (a
// jetstream.JetStream has it): the event stream, and publishes.
type StoreJS interface {
	Stream(ctx context.Context, name string) (jetstream.Stream, error)
	Publish(ctx context.Context, subject string, data []byte, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error)
}

// Store appends to and reads from the event stream.
type Store struct {
	JS    StoreJS
	Names api.Names
	// Writer is the last token of the subjects Append writes.
	Writer string
	stream jetstream.Stream
}

// NewStore binds to the event stream, which must exist. writer is the
// last token of every event it appends: api.EngineWriter, or a worker's host.
func NewStore(ctx context.Context, js StoreJS, n api.Names, writer string) (*Store, error) {
	st, err := js.Stream(ctx, n.EventsStream())
	if err != nil {
		return nil, fmt.Errorf("opening stream %s: %w", n.EventsStream(), err)
	}
	return &Store{JS: js, Names: n, Writer: writer, stream: st}, nil
}

// Stream is the event stream handle.
func (s *Store) Stream() jetstream.Stream { return s.stream }

// NoExpect appends without a concurrency check (results are facts).
const NoExpect = ^uint64(0)

// Append stores ev on vm.evt.<vm>.<type> with msgID for deduplication. If
// expect is not NoExpect, the append succeeds only if the VM's last event is
// at stream sequence expect (0: the VM has no events); otherwise it returns
// ErrConflict. dup reports that msgID was already stored.
func (s *Store) Append(ctx context.Context, ev *api.Event, expect uint64, msgID string) (seq uint64, dup bool, err error) {
	opts := []jetstream.PublishOpt{}
	if msgID != "" {
		opts = append(opts, jetstream.WithMsgID(msgID))
	}
	if expect != NoExpect {
		opts = append(opts, jetstream.WithExpectLastSequenceForSubject(expect, s.Names.VMEvents(ev.VM)))
	}
	ack, err := s.JS.Publish(ctx, s.Names.Event(ev.VM, ev.Type, s.Writer), ev.Encode(), opts...)
	if err != nil {
		if IsConflict(err) {
			return 0, false, fmt.Errorf("appending %s for vm %s: %w", ev.Type, ev.VM, ErrConflict)
		}
		return 0, false, fmt.Errorf("appending %s for vm %s: %w", ev.Type, ev.VM, err)
	}
	return ack.Sequence, ack.Duplicate, nil
}

// AppendAsync stores an event without waiting for its ack, expecting
// nothing of the VM's events: for a rejection, which moves no record (the
// engine's rate limit stores them so, at the rate of the flood). The JS
// must publish asynchronously (jetstream.JetStream does).
func (s *Store) AppendAsync(ev *api.Event, msgID string) (jetstream.PubAckFuture, error) {
	aj, ok := s.JS.(interface {
		PublishAsync(subject string, data []byte, opts ...jetstream.PublishOpt) (jetstream.PubAckFuture, error)
	})
	if !ok {
		return nil, errors.New("appending asynchronously: this JetStream cannot publish asynchronously")
	}
	return aj.PublishAsync(s.Names.Event(ev.VM, ev.Type, s.Writer), ev.Encode(), jetstream.WithMsgID(msgID))
}

// AppendInvalid stores the rejection of a command whose VM name breaks
// the name rule, under api.InvalidVM (the name cannot be a subject token);
// the body keeps the raw name.
func (s *Store) AppendInvalid(ctx context.Context, ev *api.Event, msgID string) error {
	_, err := s.JS.Publish(ctx, s.Names.Event(api.InvalidVM, api.TypeRejected, s.Writer), ev.Encode(), jetstream.WithMsgID(msgID))
	return err
}

// AppendHost stores a host event (vm.host.<host>.<type>), deduplicated by
// its message id: every engine sees the same change and stores it once.
func (s *Store) AppendHost(ctx context.Context, ev *api.HostEvent, msgID string) (seq uint64, dup bool, err error) {
	ack, err := s.JS.Publish(ctx, s.Names.HostEvent(ev.Host, ev.Type), ev.Encode(), jetstream.WithMsgID(msgID))
	if err != nil {
		return 0, false, fmt.Errorf("appending %s for host %s: %w", ev.Type, ev.Host, err)
	}
	return ack.Sequence, ack.Duplicate, nil
}

// IsConflict reports a wrong-last-sequence error from the server.
func IsConflict(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
	}
	return errors.Is(err, ErrConflict)
}

// Stored is an event with its stream sequence.
type Stored struct {
	Seq   uint64
	Event *api.Event
}

// ReadVM returns the VM's events with stream sequence >= from, in order, by
// direct gets (cheap for the few events that follow a cached position), as
// of the VM's last event when the read starts. Undecodable events are
// returned with a nil api.Event so callers can skip them knowingly.
//
// It asks for the VM's last event first: the server finds it in its
// per-subject index, while "the next event of vm.evt.<vm>.> from seq" can
// make it scan every message after seq. The common answers (nothing new,
// or one new event) then take that one request, and a longer read stops
// at the last event instead of scanning to the end of the stream to learn
// that nothing follows.
func (s *Store) ReadVM(ctx context.Context, vmName string, from uint64) ([]Stored, error) {
	if from == 0 {
		from = 1
	}
	subj := s.Names.VMEvents(vmName)
	stored := func(m *jetstream.RawStreamMsg) Stored {
		seq, relayed := storedAs(m)
		ev, err := DecodeStored(s.Names, m.Subject, m.Data)
		if err != nil || relayed {
			ev = nil
		}
		return Stored{Seq: seq, Event: ev}
	}
	last, err := s.stream.GetLastMsgForSubject(ctx, subj)
	if err != nil {
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil, nil
		}
		return nil, fmt.Errorf("reading the last event of vm %s: %w", vmName, err)
	}
	last.Sequence, _ = storedAs(last)
	if last.Sequence < from {
		return nil, nil
	}
	var out []Stored
	for from < last.Sequence {
		m, err := s.stream.GetMsg(ctx, from, jetstream.WithGetMsgSubject(subj))
		if err != nil {
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				break // cannot happen while last exists; read what is there
			}
			return out, fmt.Errorf("reading events of vm %s from %d: %w", vmName, from, err)
		}
		m.Sequence, _ = storedAs(m)
		if m.Sequence >= last.Sequence {
			break
		}
		out = append(out, stored(m))
		from = m.Sequence + 1
	}
	return append(out, stored(last)), nil
}

// FollowVM calls fn with each of the VM's events with stream sequence >=
// from, in order, as they are stored, until fn returns false or ctx ends
// (then it returns ctx's error). It reads by direct gets (ReadVM), asking
// again after a pause that starts at FollowPoll.First and doubles up to
// FollowPoll.Max while nothing new comes (back to the first after an
// event), so it creates nothing on the server: a follower that ends, or
// dies, leaves nothing behind, and the number of followers costs no
// consumers (see docs/architecture.md, "Consumers and their bound"). A
// read that fails for a reason that goes away (a timeout, a stream
// leader's election, a reconnect) is tried again.
func (s *Store) FollowVM(ctx context.Context, vmName string, from uint64, fn func(Stored) bool) error {
	wait := FollowPoll.First
	for {
		evs, err := s.ReadVM(ctx, vmName, from)
		switch {
		case err == nil:
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, nats.ErrConnectionClosed) || !jsetup.Transient(err):
			return err // a closed connection does not come back
		}
		for _, st := range evs {
			from = st.Seq + 1
			if !fn(st) {
				return nil
			}
		}
		if len(evs) > 0 {
			wait = FollowPoll.First
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		if len(evs) == 0 {
			wait = min(2*wait, FollowPoll.Max)
		}
	}
}

// FollowPoll bounds FollowVM's pause between reads: a command's decision
// and a Noop result come within milliseconds, a QEMU start within
// seconds; at the longest pause a follower costs the server four direct
// gets a second.
var FollowPoll = struct{ First, Max time.Duration }{5 * time.Millisecond, 250 * time.Millisecond}

// RelayedCopy reports whether a message read by a direct get (GetMsg,
// GetLastMsgForSubject) was stored by the server on a client's behalf
// (StoredByServer; a direct get's own answer carries those headers, so
// StoredByServer cannot be asked of it).
func RelayedCopy(m *jetstream.RawStreamMsg) bool {
	_, relayed := storedAs(m)
	return relayed
}

// StoredSeq is the sequence a message read by a direct get is stored at
// in the stream it was read from (see storedAs).
func StoredSeq(m *jetstream.RawStreamMsg) uint64 {
	seq, _ := storedAs(m)
	return seq
}

// storedAs returns the sequence m is stored at in the stream it was read
// from, and whether the server stored it on someone's behalf
// (StoredByServer). A direct get answers with Nats-Stream, Nats-Subject
// and Nats-Sequence headers added after the stored message's own; the
// client library takes the first of each, which for a stored answer of
// another direct get are the original message's: its subject and its
// sequence in another stream. The last are the stored message's. Read
// through the API instead, the stored headers come back as they are, and
// a stored answer's Nats-Subject is not the subject it is stored on.
func storedAs(m *jetstream.RawStreamMsg) (seq uint64, relayed bool) {
	seqs := m.Header.Values("Nats-Sequence")
	switch {
	case len(seqs) > 1:
		if n, err := strconv.ParseUint(seqs[len(seqs)-1], 10, 64); err == nil {
			return n, true
		}
		return m.Sequence, true
	case len(seqs) == 1 && m.Header.Get("Nats-Subject") != m.Subject:
		return m.Sequence, true
	}
	return m.Sequence, false
}

// LastSeq returns the stream sequence of the VM's last event (0 if none).
func (s *Store) LastSeq(ctx context.Context, vmName string) (uint64, error) {
	m, err := s.stream.GetLastMsgForSubject(ctx, s.Names.VMEvents(vmName))
	if err != nil {
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return 0, nil
		}
		return 0, err
	}
	seq, _ := storedAs(m)
	return seq, nil
}

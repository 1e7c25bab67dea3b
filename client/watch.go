package client

import (
	"context"
	"errors"
	"iter"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
)

// WatchOptions choose which events Watch yields and from where.
type WatchOptions struct {
	// VM: only this VM's events. Host: only events about this host: its
	// host events, and the VMs' events it wrote or that place a VM on it.
	// Neither: every VM's and host's events.
	VM, Host string
	// From is the stream sequence to start at (inclusive). With From 0,
	// History starts at the first event the stream keeps; without it,
	// only events stored after Watch is called are yielded.
	From    uint64
	History bool
	// Until, if not 0, ends the watch once every event up to this
	// sequence is read (LastSeq gives the stream's end now).
	Until uint64
}

// watchPoll bounds the pause between reads while nothing new comes.
var watchPoll = struct{ First, Max time.Duration }{5 * time.Millisecond, 250 * time.Millisecond}

// Watch yields the events o selects, in stream order, as they are stored,
// until ctx ends (the loop then just ends) or a permanent error (yielded
// once, then the loop ends). It reads by direct gets from the sequence
// after the last one it yielded, so it creates nothing on the server and
// keeps its place across reconnects, a NATS server's restart and a stream
// leader's election: no event is skipped and none is yielded twice. While
// nothing new comes it asks again after a pause that grows from 5 ms to
// 250 ms. Events a writer may not write (vmherd's fold ignores them) are
// yielded too, with their Writer: api.VmRecord.Trusts tells them apart;
// messages the server stored on someone's behalf are skipped.
func (c *Client) Watch(ctx context.Context, o WatchOptions) iter.Seq2[Stored, error] {
	return func(yield func(Stored, error) bool) {
		from, err := c.watchStart(ctx, o)
		if err != nil {
			if ctx.Err() == nil {
				yield(Stored{}, err)
			}
			return
		}
		filter := ">"
		if o.VM != "" {
			filter = c.names.VMEvents(o.VM)
		}
		wait := watchPoll.First
		for {
			raws, _, err := events.ReadStream(ctx, c.js, c.names.EventsStream(), filter, from, 256)
			switch {
			case ctx.Err() != nil:
				return
			case err == nil:
			case errors.Is(err, nats.ErrConnectionClosed) || !jsetup.Transient(err) && !errors.Is(err, nats.ErrTimeout):
				yield(Stored{}, notAllowed(err))
				return
			}
			for _, r := range raws {
				if o.Until > 0 && r.Seq > o.Until {
					return
				}
				from = r.Seq + 1
				st, ok := c.decodeRaw(r)
				if !ok || !o.matches(st) {
					continue
				}
				if !yield(st, nil) {
					return
				}
			}
			if o.Until > 0 && from > o.Until || o.Until > 0 && err == nil && len(raws) == 0 {
				return // read to Until (nothing matches after from)
			}
			if len(raws) > 0 {
				wait = watchPoll.First
				if err == nil {
					continue
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			wait = min(2*wait, watchPoll.Max)
		}
	}
}

// LastSeq is the events stream's last sequence now (0: empty).
func (c *Client) LastSeq(ctx context.Context) (uint64, error) {
	store, err := c.eventStore(ctx)
	if err != nil {
		return 0, err
	}
	info, err := store.Stream().Info(ctx)
	if err != nil {
		return 0, notAllowed(err)
	}
	return info.State.LastSeq, nil
}

// watchStart is the first sequence to read.
func (c *Client) watchStart(ctx context.Context, o WatchOptions) (uint64, error) {
	switch {
	case o.From > 0:
		return o.From, nil
	case o.History:
		return 1, nil
	}
	store, err := c.eventStore(ctx)
	if err != nil {
		return 0, err
	}
	info, err := store.Stream().Info(ctx)
	if err != nil {
		return 0, notAllowed(err)
	}
	return info.State.LastSeq + 1, nil
}

func (c *Client) decodeRaw(r events.Raw) (Stored, bool) {
	if r.Relayed {
		return Stored{}, false
	}
	if _, _, isHost := c.names.ParseHostEventSubject(r.Subject); isHost {
		hev, err := api.DecodeHostEvent(r.Data)
		if err != nil {
			return Stored{}, false
		}
		return Stored{Seq: r.Seq, Time: hev.Time, HostEvent: hev}, true
	}
	ev, err := events.DecodeStored(c.names, r.Subject, r.Data)
	if err != nil {
		return Stored{}, false
	}
	return Stored{Seq: r.Seq, Time: ev.Time, Event: ev}, true
}

func (o WatchOptions) matches(st Stored) bool {
	switch {
	case o.VM != "":
		return st.Event != nil && st.Event.VM == o.VM
	case o.Host == "":
		return true
	case st.HostEvent != nil:
		return st.HostEvent.Host == o.Host
	}
	ev := st.Event
	return ev.Writer == o.Host || ev.Host == o.Host ||
		ev.Migration != nil && (ev.Migration.From == o.Host || ev.Migration.To == o.Host)
}

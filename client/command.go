package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
)

// NewCommandID returns a fresh random command id. A command id is the
// command's identity: publishing the same VM, action and id again (a
// retry after a timeout or a reconnect) is dropped by the server as a
// duplicate, so it is done once.
func NewCommandID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "c-" + hex.EncodeToString(b[:])
}

// Sent is a command stored in VM_COMMANDS.
type Sent struct {
	VM        string
	Action    api.Action
	CommandID string
	// Seq is the command's sequence in VM_COMMANDS; Duplicate says the
	// server already had it (an earlier send of the same id).
	Seq       uint64
	Duplicate bool
	// From is the VM_EVENTS sequence the command's events come at or
	// after (the stream's end before the publish): Wait reads from it.
	From uint64
	// NoEngine, when set, says why no engine was deciding commands when
	// it was sent: it waits for one.
	NoEngine string
}

// Send stores a command without waiting for it: the engines decide it
// when they can (Wait follows it). A command without an id gets one
// (NewCommandID); sending again with the same id is safe. Send checks the
// name and action here; everything else the engine checks, and a
// rejection comes as an event.
func (c *Client) Send(ctx context.Context, name string, action api.Action, cmd api.Command) (*Sent, error) {
	serving, why, err := c.EngineServing(ctx, 0)
	if err != nil {
		return nil, err
	}
	s, err := c.send(ctx, name, action, cmd)
	if s != nil && !serving {
		s.NoEngine = why
	}
	return s, err
}

func (c *Client) send(ctx context.Context, name string, action api.Action, cmd api.Command) (*Sent, error) {
	if err := api.ValidateName(name); err != nil {
		return nil, err
	}
	if _, err := api.ParseAction(string(action)); err != nil {
		return nil, err
	}
	if cmd.CommandID == "" {
		cmd.CommandID = NewCommandID()
	}
	body, err := json.Marshal(cmd)
	if err != nil {
		return nil, err
	}
	// Read the VM's events from the stream's end as it is before the
	// publish, so that only stored events count: a core subscription can
	// see an event a moment before JetStream stores it, and a next command
	// sent on that sight could be decided on the older state.
	store, err := c.eventStore(ctx)
	if err != nil {
		return nil, err
	}
	info, err := store.Stream().Info(ctx)
	if err != nil {
		return nil, notAllowed(fmt.Errorf("reading %s: %w", c.names.EventsStream(), err))
	}
	s := &Sent{VM: name, Action: action, CommandID: cmd.CommandID, From: info.State.LastSeq + 1}
	// VM_COMMANDS deduplicates message ids across every VM; the command id
	// is only unique per VM, so the message id names the VM too.
	ack, err := c.publish(ctx, c.names.IssuedCommand(name, string(action), c.issuer), body, api.CommandMsgID(name, cmd.CommandID))
	if err != nil {
		return nil, fmt.Errorf("publishing %s for %s: %w", action, name, err)
	}
	s.Seq, s.Duplicate = ack.Sequence, ack.Duplicate
	return s, nil
}

// publishAttempt bounds one attempt of publish: an ack that does not come
// (a stream leader's election, a reconnect, a server restart) is asked for
// again with the same message id, which the server stores at most once.
var publishAttempt = 2 * time.Second

// publish stores a message with JetStream, trying again until ctx ends.
// A subject the server refuses is an ErrNotAllowed at once: the refusal
// comes as the connection's last error, not as an answer.
func (c *Client) publish(ctx context.Context, subj string, body []byte, msgID string) (*jetstream.PubAck, error) {
	wait := 50 * time.Millisecond
	for {
		pctx, cancel := context.WithTimeout(ctx, publishAttempt)
		ack, err := c.js.Publish(pctx, subj, body, jetstream.WithMsgID(msgID))
		cancel()
		if err == nil {
			return ack, nil
		}
		if e := c.nc.LastError(); e != nil && strings.Contains(e.Error(), `Permissions Violation for Publish to "`+subj+`"`) {
			return nil, &allowedError{fmt.Errorf("the server refused %s to this identity: %w", subj, e)}
		}
		if errors.Is(err, nats.ErrPermissionViolation) {
			return nil, &allowedError{err}
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w (the command may or may not be stored: sending it again with its id is safe)", ctx.Err())
		}
		if !jsetup.Transient(err) && !errors.Is(err, context.DeadlineExceeded) {
			return nil, notAllowed(fmt.Errorf("%w (nothing was stored)", err))
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
		wait = min(2*wait, time.Second)
	}
}

// Result is what became of a command.
type Result struct {
	VM        string
	Action    api.Action
	CommandID string
	// Decision is the engine's accepted event (or, for a cancel, the
	// outcome itself).
	Decision *api.Event
	// Final is the event that ended the command: its result, or the
	// decision of a cancel. Seq is its stream sequence.
	Final *api.Event
	Seq   uint64
	// Record is the VM's record once it includes Final (nil if the
	// projection did not catch up within a few seconds: the result
	// stands).
	Record *api.VmRecord
}

// Progress is what a wait is waiting for, reported to WithProgress.
type Progress struct {
	VM        string
	Action    api.Action
	CommandID string
	// Waiting is "decision", "result" or "copy" (a migrate's copy).
	Waiting string
	Since   time.Time
	// Host is the accepted host (waiting for a result).
	Host string
	// Bytes of Total copied (waiting for a copy).
	Bytes, Total int64
	// Trouble, when not empty, says why the wait may be long: the NATS
	// connection is down, or no engine is taking commands.
	Trouble string
}

type waitOpts struct {
	progress  func(Progress)
	recordLag time.Duration
	noEngine  time.Duration
}

// A WaitOption changes how Do and Wait wait.
type WaitOption func(*waitOpts)

// WithProgress calls fn when the wait moves on (decided, copying) and
// once a second while it waits, from the waiting goroutine.
func WithProgress(fn func(Progress)) WaitOption { return func(o *waitOpts) { o.progress = fn } }

// WithNoEngineAfter ends a wait for a decision with a NoEngineError once
// no engine has been taking commands for d (default 3 s; 0 waits on).
func WithNoEngineAfter(d time.Duration) WaitOption { return func(o *waitOpts) { o.noEngine = d } }

// Do sends a command and waits for its result and for the VM's record to
// include it. It returns a *RejectedError, *FailedError, *TimeoutError
// (ctx ended first) or *NoEngineError (no engine takes commands: nothing
// is sent) when the command did not succeed.
func (c *Client) Do(ctx context.Context, name string, action api.Action, cmd api.Command, opts ...WaitOption) (*Result, error) {
	if err := api.ValidateName(name); err != nil {
		return nil, err
	}
	serving, why, err := c.EngineServing(ctx, time.Second)
	if err != nil {
		return nil, err
	}
	if !serving {
		return nil, &NoEngineError{Reason: why + "; nothing was sent"}
	}
	s, err := c.send(ctx, name, action, cmd)
	if err != nil {
		return nil, err
	}
	return c.Wait(ctx, s, opts...)
}

// Wait follows a sent command until its result, reading the VM's events
// from s.From by direct gets (no consumer is left on the server), then
// waits briefly for the record to include it.
func (c *Client) Wait(ctx context.Context, s *Sent, opts ...WaitOption) (*Result, error) {
	o := waitOpts{recordLag: 5 * time.Second, noEngine: 3 * time.Second}
	for _, f := range opts {
		f(&o)
	}
	store, err := c.eventStore(ctx)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	evc := make(chan events.Stored)
	errc := make(chan error, 1)
	go func() {
		errc <- store.FollowVM(wctx, s.VM, s.From, func(st events.Stored) bool {
			if st.Event == nil || st.Event.CommandID != s.CommandID {
				return true
			}
			select {
			case evc <- st:
				return true
			case <-wctx.Done():
				return false
			}
		})
	}()
	res := &Result{VM: s.VM, Action: s.Action, CommandID: s.CommandID}
	p := Progress{VM: s.VM, Action: s.Action, CommandID: s.CommandID, Waiting: "decision", Since: time.Now()}
	report := func() {
		if o.progress != nil {
			o.progress(p)
		}
	}
	report()
	var idleSince time.Time
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case st := <-evc:
			ev := st.Event
			accepted := res.Decision
			switch {
			case !ev.FromEngine() && (accepted == nil || ev.Writer != accepted.Host):
				// Only an engine decides, and only the VM's host's worker
				// (or an engine) answers: anything else is ignored, as the
				// fold ignores it.
			case ev.Type == api.TypeRejected:
				if s.Action == "" {
					s.Action = ev.Action
				}
				return nil, c.rejection(ctx, s, ev)
			case ev.Type == api.TypeAccepted && ev.Action == api.ActPurge:
				// A purge's decision is its outcome; the record is gone
				// once the projection has folded it (Record stays nil).
				res.Decision, res.Final, res.Seq = ev, ev, st.Seq
				c.awaitGone(ctx, s.VM, o.recordLag)
				return res, nil
			case ev.Type == api.TypeAccepted && ev.Cancel:
				// A cancel ends the migration at once: its decision is the
				// outcome (the engines store the migrate's failure).
				res.Decision, res.Final, res.Seq = ev, ev, st.Seq
				res.Record = c.awaitRecord(ctx, s.VM, st.Seq, o.recordLag)
				return res, nil
			case ev.Type == api.TypeMigration:
				if m := ev.Migration; m != nil && m.Phase == api.PhaseCopying && m.Total > 0 {
					p.Waiting, p.Bytes, p.Total = "copy", m.Bytes, m.Total
					report()
				}
			case ev.Type == api.TypeAccepted:
				if s.Action == "" { // WaitCommand: known from its decision
					s.Action, res.Action, p.Action = ev.Action, ev.Action, ev.Action
				}
				res.Decision = ev
				p.Waiting, p.Host, p.Since = "result", ev.Host, time.Now()
				report()
			case ev.Type == api.TypeFailed:
				res.Final, res.Seq = ev, st.Seq
				res.Record = c.awaitRecord(ctx, s.VM, st.Seq, o.recordLag)
				return res, &FailedError{VM: s.VM, Action: s.Action, CommandID: s.CommandID, Host: ev.Host, Message: ev.Error, Event: ev}
			case ev.Type.IsResult():
				res.Final, res.Seq = ev, st.Seq
				res.Record = c.awaitRecord(ctx, s.VM, st.Seq, o.recordLag)
				return res, nil
			}
		case err := <-errc:
			if ctx.Err() == nil {
				return nil, fmt.Errorf("reading %s's events: %w; %w", s.VM, err, c.timeout(s, res, nil))
			}
			return nil, c.timeout(s, res, ctx.Err())
		case <-ctx.Done():
			return nil, c.timeout(s, res, ctx.Err())
		case <-tick.C:
			p.Trouble = ""
			if down := c.DownSince(); !down.IsZero() {
				p.Trouble = fmt.Sprintf("the connection to NATS is down since %s; reconnecting", down.Format("15:04:05"))
			} else if res.Decision == nil {
				// Before the decision, engines that went away are worth
				// saying at once rather than at the deadline.
				if ok, why, err := c.EngineServing(ctx, 0); err == nil && !ok {
					if idleSince.IsZero() {
						idleSince = time.Now()
					}
					p.Trouble = why
					if o.noEngine > 0 && time.Since(idleSince) >= o.noEngine {
						return nil, &NoEngineError{Reason: why, Stored: true, VM: s.VM, Action: s.Action, CommandID: s.CommandID}
					}
				} else {
					idleSince = time.Time{}
				}
			} else if res.Final == nil && c.HostLost(ctx, res.Decision.Host) {
				// Accepted: the result comes from the host's worker, and
				// the host has stopped heartbeating.
				p.Trouble = fmt.Sprintf("host %s is lost (its worker stopped heartbeating); the result comes when it is back, or the VM is forgotten", res.Decision.Host)
			}
			report()
		}
	}
}

func (c *Client) timeout(s *Sent, res *Result, err error) error {
	e := &TimeoutError{VM: s.VM, Action: s.Action, CommandID: s.CommandID, Err: err}
	if res.Decision != nil {
		e.Accepted, e.Host = true, res.Decision.Host
	}
	return e
}

// rejection builds the RejectedError, finding out whether the VM exists.
func (c *Client) rejection(ctx context.Context, s *Sent, ev *api.Event) error {
	e := &RejectedError{VM: s.VM, Action: s.Action, CommandID: s.CommandID, Reason: ev.Reason, Event: ev}
	if s.Action != api.ActPrepare {
		if _, err := c.Record(ctx, s.VM); errors.Is(err, ErrNotFound) {
			e.NoSuchVM = true
		}
	}
	return e
}

// awaitRecord waits, at most lag, until the VM's record has folded the
// event at seq, so that what the caller does next with the record (ssh,
// provision, state) sees the result it just got: the projector writes the
// record a moment after the event is stored.
func (c *Client) awaitRecord(ctx context.Context, name string, seq uint64, lag time.Duration) *api.VmRecord {
	ctx, cancel := context.WithTimeout(ctx, lag)
	defer cancel()
	for {
		if r, err := c.Record(ctx, name); err == nil && r.LastSeq >= seq {
			return r
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// awaitGone waits, at most lag, until the VM's record has left VM_RECORDS
// (a purge's fold), so that a list or a completion after it no longer
// shows the VM.
func (c *Client) awaitGone(ctx context.Context, name string, lag time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, lag)
	defer cancel()
	for {
		if _, err := c.Record(ctx, name); errors.Is(err, ErrNotFound) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// EngineServing tells whether an engine is deciding commands: every
// running engine keeps pull requests open on the shared command consumer,
// and they vanish with its connection. It samples for up to within (a busy
// engine renews its pulls), and on false says why.
func (c *Client) EngineServing(ctx context.Context, within time.Duration) (bool, string, error) {
	deadline := time.Now().Add(within)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		cons, err := c.js.Consumer(cctx, c.names.CommandsStream(), c.names.CommandConsumer())
		var info *jetstream.ConsumerInfo
		if err == nil {
			info = cons.CachedInfo()
		}
		cancel()
		why := fmt.Sprintf("no engine is consuming commands on %s (the command consumer %q has no active pull request)", c.url, c.names.CommandConsumer())
		switch {
		case errors.Is(err, jetstream.ErrStreamNotFound):
			why = fmt.Sprintf("stream %s does not exist: no vmherd engine has run on %s", c.names.CommandsStream(), c.url)
		case errors.Is(err, jetstream.ErrConsumerNotFound):
			why = fmt.Sprintf("no engine has ever consumed %s on %s", c.names.CommandsStream(), c.url)
		case err != nil && ctx.Err() != nil:
			return false, "", ctx.Err()
		case err != nil:
			return false, "", notAllowed(fmt.Errorf("asking for the engines' command consumer: %w", err))
		case info.NumWaiting > 0:
			return true, "", nil
		}
		// An engine starting creates the stream and the consumer; a busy
		// one renews its pulls: ask again until within is over.
		if time.Now().After(deadline) {
			return false, why, nil
		}
		select {
		case <-ctx.Done():
			return false, "", ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Create prepares a VM from spec (spec.Name names it) and waits until it
// is prepared.
func (c *Client) Create(ctx context.Context, spec api.VmSpec, opts ...WaitOption) (*Result, error) {
	return c.Do(ctx, spec.Name, api.ActPrepare, api.Command{Spec: &spec}, opts...)
}

// Start starts a prepared or stopped VM and waits until it runs.
func (c *Client) Start(ctx context.Context, name string, opts ...WaitOption) (*Result, error) {
	return c.Do(ctx, name, api.ActStart, api.Command{}, opts...)
}

// Stop stops a running VM (ACPI shutdown, then a hard stop after timeout;
// 0: the engine's default) and waits until it is stopped.
func (c *Client) Stop(ctx context.Context, name string, timeout time.Duration, opts ...WaitOption) (*Result, error) {
	return c.Do(ctx, name, api.ActStop, api.Command{TimeoutS: int(timeout / time.Second)}, opts...)
}

// Suspend pauses a running VM.
func (c *Client) Suspend(ctx context.Context, name string, opts ...WaitOption) (*Result, error) {
	return c.Do(ctx, name, api.ActSuspend, api.Command{}, opts...)
}

// Resume continues a suspended VM.
func (c *Client) Resume(ctx context.Context, name string, opts ...WaitOption) (*Result, error) {
	return c.Do(ctx, name, api.ActResume, api.Command{}, opts...)
}

// Destroy removes a VM and its disk, in any state.
func (c *Client) Destroy(ctx context.Context, name string, opts ...WaitOption) (*Result, error) {
	return c.Do(ctx, name, api.ActDestroy, api.Command{}, opts...)
}

// Purge removes a destroyed VM (nothing in flight) from VM_RECORDS and
// its events from VM_EVENTS, so the name is new; it returns once the
// record has left the bucket. Anything else is a *RejectedError with the
// reason. Result.Final is
// the purge's decision (it has no result event) and Result.Record nil.
func (c *Client) Purge(ctx context.Context, name string, opts ...WaitOption) (*Result, error) {
	return c.Do(ctx, name, api.ActPurge, api.Command{}, opts...)
}

// Migrate moves a VM to host to ("": the engine places it), live if it
// runs, cold if not, and waits until it has moved.
func (c *Client) Migrate(ctx context.Context, name, to string, opts ...WaitOption) (*Result, error) {
	return c.Do(ctx, name, api.ActMigrate, api.Command{Host: to}, opts...)
}

package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/fsm"
)

// lifecycle is the cycle every benchmark VM goes through.
var lifecycle = []fsm.Action{fsm.ActPrepare, fsm.ActStart, fsm.ActSuspend, fsm.ActResume, fsm.ActStop, fsm.ActDestroy}

// client publishes commands as a user would (a JetStream publish to
// vm.cmd.<vm>.<action>) and learns their outcome from the event stream:
// one ordered consumer over every result and rejection, matched to the
// waiting command by command id. A command's time is from just before
// its publish to the moment its result event, stored in VM_EVENTS, is
// delivered to this client.
type client struct {
	nc    *nats.Conn
	js    jetstream.JetStream
	names api.Names
	stop  func()

	mu    sync.Mutex
	waits map[string]chan outcome
}

// outcome is a command's end: its result event (or rejection).
type outcome struct {
	At     time.Time
	Type   api.EventType
	Reason string
	Data   []byte // the event's body
}

func (o outcome) ok() bool { return o.Type.IsResult() && o.Type != api.TypeFailed }

func newClient(ctx context.Context, url string) (*client, error) {
	nc, js, err := connect(url, "bench-client")
	if err != nil {
		return nil, err
	}
	c := &client{nc: nc, js: js, names: api.DefaultNames, waits: map[string]chan outcome{}}
	st, err := js.Stream(ctx, c.names.EventsStream())
	if err != nil {
		nc.Close()
		return nil, err
	}
	var filters []string
	for _, t := range api.EventTypes {
		if t.IsResult() || t == api.TypeRejected {
			filters = append(filters, c.names.EventsOfType(t))
		}
	}
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: filters,
		DeliverPolicy:  jetstream.DeliverNewPolicy,
	})
	if err != nil {
		nc.Close()
		return nil, err
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(2000))
	if err != nil {
		nc.Close()
		return nil, err
	}
	go c.watch(it)
	c.stop = func() { it.Stop(); nc.Close() }
	return c, nil
}

func (c *client) close() { c.stop() }

func (c *client) watch(it jetstream.MessagesContext) {
	for {
		m, err := it.Next()
		if err != nil {
			return
		}
		at := time.Now()
		var ev struct {
			Type      api.EventType `json:"type"`
			CommandID string        `json:"command_id"`
			Reason    string        `json:"reason"`
			Error     string        `json:"error"`
		}
		if json.Unmarshal(m.Data(), &ev) != nil || ev.CommandID == "" {
			continue
		}
		c.mu.Lock()
		ch := c.waits[ev.CommandID]
		delete(c.waits, ev.CommandID)
		c.mu.Unlock()
		if ch != nil {
			reason := ev.Reason
			if reason == "" {
				reason = ev.Error
			}
			ch <- outcome{At: at, Type: ev.Type, Reason: reason, Data: m.Data()}
		}
	}
}

// body is a command's JSON body.
func body(vmName, action, cmdID string) []byte {
	if action == "prepare" {
		return []byte(`{"command_id":"` + cmdID + `","spec":{"name":"` + vmName + `","backend":"noop","vcpus":1,"memory_mb":128}}`)
	}
	return []byte(`{"command_id":"` + cmdID + `"}`)
}

// do publishes one command and waits for its outcome. It returns when the
// command was published (just before the publish) and its outcome.
func (c *client) do(ctx context.Context, vmName, action, cmdID string) (time.Time, outcome, error) {
	return c.doBody(ctx, vmName, action, cmdID, body(vmName, action, cmdID))
}

func (c *client) doBody(ctx context.Context, vmName, action, cmdID string, data []byte) (time.Time, outcome, error) {
	ch := make(chan outcome, 1)
	c.mu.Lock()
	c.waits[cmdID] = ch
	c.mu.Unlock()
	m := nats.NewMsg(c.names.Command(vmName, action))
	m.Data = data
	m.Header.Set(jetstream.MsgIDHeader, cmdID)
	sent := time.Now()
	if _, err := c.js.PublishMsg(ctx, m); err != nil {
		c.forget(cmdID)
		return sent, outcome{}, fmt.Errorf("publishing %s of vm %s: %w", action, vmName, err)
	}
	select {
	case o := <-ch:
		return sent, o, nil
	case <-ctx.Done():
		c.forget(cmdID)
		return sent, outcome{}, fmt.Errorf("waiting for the result of %s of vm %s: %w", action, vmName, ctx.Err())
	}
}

func (c *client) forget(cmdID string) {
	c.mu.Lock()
	delete(c.waits, cmdID)
	c.mu.Unlock()
}

// cycler walks one VM through the lifecycle, one command at a time. After
// a rejection or failure it destroys the VM and starts over, so a single
// error does not cascade into a stream of rejections.
type cycler struct {
	name string
	step int
	n    int
}

func newCycler(name string) *cycler { return &cycler{name: name} }

// next returns the next action and a command id unique across the run.
func (v *cycler) next() (action, cmdID string) {
	v.n++
	return string(lifecycle[v.step]), v.name + "-" + strconv.Itoa(v.n)
}

// done moves the VM on after an outcome.
func (v *cycler) done(o outcome) {
	switch {
	case o.ok():
		v.step = (v.step + 1) % len(lifecycle)
	case lifecycle[v.step] == fsm.ActDestroy:
		v.step = 0 // destroy failed or was rejected (already destroyed): prepare again
	default:
		v.step = len(lifecycle) - 1
	}
}

// storedAt are the stream timestamps of a command and of its decision and
// result events.
type storedAt struct{ cmd, accepted, result time.Time }

// storedTimes reads when the server stored each command of a VM and its
// accepted and result events, by command id.
func (c *client) storedTimes(ctx context.Context, vmName string) (map[string]*storedAt, error) {
	out := map[string]*storedAt{}
	at := func(id string) *storedAt {
		if out[id] == nil {
			out[id] = &storedAt{}
		}
		return out[id]
	}
	read := func(stream, subject string, f func(m jetstream.Msg, ts time.Time)) error {
		st, err := c.js.Stream(ctx, stream)
		if err != nil {
			return err
		}
		info, err := st.Info(ctx, jetstream.WithSubjectFilter(subject))
		if err != nil {
			return err
		}
		var total uint64
		for _, n := range info.State.Subjects {
			total += n
		}
		if total == 0 {
			return nil
		}
		cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
		if err != nil {
			return err
		}
		for seen := uint64(0); seen < total; {
			batch, err := cons.Fetch(int(min(total-seen, 1000)), jetstream.FetchMaxWait(5*time.Second))
			if err != nil {
				return err
			}
			n := 0
			for m := range batch.Messages() {
				n++
				if md, err := m.Metadata(); err == nil {
					f(m, md.Timestamp)
				}
			}
			if n == 0 {
				return fmt.Errorf("reading %s: stream ended early", subject)
			}
			seen += uint64(n)
		}
		return nil
	}
	if err := read(c.names.CommandsStream(), c.names.Command(vmName, "*"), func(m jetstream.Msg, ts time.Time) {
		at(m.Headers().Get(jetstream.MsgIDHeader)).cmd = ts
	}); err != nil {
		return nil, err
	}
	err := read(c.names.EventsStream(), c.names.VMEvents(vmName), func(m jetstream.Msg, ts time.Time) {
		var ev struct {
			Type      api.EventType `json:"type"`
			CommandID string        `json:"command_id"`
		}
		if json.Unmarshal(m.Data(), &ev) != nil {
			return
		}
		switch {
		case ev.Type == api.TypeAccepted:
			at(ev.CommandID).accepted = ts
		case ev.Type.IsResult():
			at(ev.CommandID).result = ts
		}
	})
	return out, err
}

package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/origin"
)

// ReplaySize is how much recent output a new viewer is shown.
const ReplaySize = 16 << 10

// chunkSize bounds one console output message.
const chunkSize = 16 << 10

// Hub is the far end of a VM's console, on the VM's host: one connection
// to the backend's console, read all the time (so the guest never waits
// for a viewer), its output published on the VM's out subject for any
// number of viewers, and what viewers type written to the console. It
// keeps the last ReplaySize bytes for viewers that attach later. A slow
// viewer cannot hold it up: output goes out as core NATS messages, which
// the server and the viewer's client drop for a subscriber that falls
// behind (bounded buffers), never waiting for it.
//
// Input is bounded and shared fairly: what each typist (Requester of the
// message's reply inbox) sends waits in a queue of its own of at most
// InputPerTypist bytes, at most InputPerConsole in all, and the queues
// are written to the console in turns of at most inputTurn bytes, each
// write with a deadline; what does not fit is dropped (and logged), and
// a guest that reads nothing for InputWriteTimeout has its waiting input
// dropped. So one viewer's burst costs another's keystrokes one turn per
// typist, not the burst, and the worker holds a bounded amount.
type Hub struct {
	nc      *nats.Conn
	out     string
	conn    io.ReadWriteCloser
	log     *slog.Logger
	in      *nats.Subscription
	mu      sync.Mutex
	ring    []byte
	offset  uint64 // bytes read from the console so far
	done    chan struct{}
	closeMu sync.Once
	input   *inputQueue
}

// Console input bounds (see Hub).
const (
	InputPerTypist  = 64 << 10
	InputPerConsole = 1 << 20
	// InputWriteTimeout: a console that takes nothing for this long has
	// its waiting input dropped.
	InputWriteTimeout = 10 * time.Second
	inputTurn         = 1 << 10
	consoleSendBuffer = 4 << 10
	// What the NATS client may buffer for the input subscription before
	// the hub has queued it (the callback only queues, so it seldom holds
	// anything); past it the client drops messages.
	inputPendingMsgs  = 4096
	inputPendingBytes = 2 << 20
)

// StartHub relays conn, the console of vmName on host, until it ends or
// Close. seed is output from before (the console log's end), replayed to
// the first viewers. onEnd runs once when it has ended.
func StartHub(nc *nats.Conn, names api.Names, host, vmName string, conn io.ReadWriteCloser, seed []byte, log *slog.Logger, onEnd func()) (*Hub, error) {
	if len(seed) > ReplaySize {
		seed = seed[len(seed)-ReplaySize:]
	}
	h := &Hub{
		nc: nc, out: names.Console(host, vmName, api.ConsoleOut), conn: conn,
		log: log.With("vm", vmName, "part", "console"), done: make(chan struct{}),
		ring: append([]byte(nil), seed...), offset: uint64(len(seed)),
	}
	h.input = newInputQueue()
	// What is written waits in the socket for the guest to read it; a
	// small send buffer keeps the turns (not the kernel) deciding whose
	// input goes next.
	if wb, ok := conn.(interface{ SetWriteBuffer(int) error }); ok {
		_ = wb.SetWriteBuffer(consoleSendBuffer)
	}
	in, err := nc.Subscribe(names.Console(host, vmName, api.ConsoleIn), func(m *nats.Msg) {
		if origin.Relayed(m.Reply, m.Header) {
			// A stored message the server delivered here on someone's
			// behalf (a consumer's deliver subject), not keystrokes.
			return
		}
		h.input.put(Requester(m.Reply), m.Data)
	})
	if err != nil {
		return nil, fmt.Errorf("relay: console input subscription: %w", err)
	}
	if err := in.SetPendingLimits(inputPendingMsgs, inputPendingBytes); err != nil {
		_ = in.Unsubscribe()
		return nil, fmt.Errorf("relay: bounding the console input subscription: %w", err)
	}
	h.in = in
	go h.pump(onEnd)
	go h.keepalive()
	go h.typist()
	return h, nil
}

// typist writes the queued input to the console, a turn per typist.
func (h *Hub) typist() {
	wd, _ := h.conn.(writeDeadliner)
	for {
		b, ok := h.input.next(h.done)
		if !ok {
			return
		}
		if wd != nil {
			_ = wd.SetWriteDeadline(time.Now().Add(InputWriteTimeout))
		}
		if _, err := h.conn.Write(b); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				n := h.input.drop()
				h.log.Warn("the console took no input for a while: dropped what was waiting", "wait", InputWriteTimeout, "bytes", n+len(b))
				continue
			}
			h.log.Debug("writing to the console failed", "err", err)
		}
		if n := h.input.takeDropped(); n > 0 {
			h.log.Warn("console input dropped: a typist sent more than the console takes", "bytes", n, "per_typist", InputPerTypist, "per_console", InputPerConsole)
		}
	}
}

// inputQueue is a console's waiting input: a queue per typist, served in
// turns.
type inputQueue struct {
	mu      sync.Mutex
	queues  map[string][]byte
	order   []string // typists with input, in turn order
	total   int
	dropped int
	ready   chan struct{} // signalled when input arrives
}

func newInputQueue() *inputQueue {
	return &inputQueue{queues: map[string][]byte{}, ready: make(chan struct{}, 1)}
}

// put queues what who typed, as much as fits.
func (q *inputQueue) put(who string, b []byte) {
	q.mu.Lock()
	cur, had := q.queues[who]
	n := min(len(b), InputPerTypist-len(cur), InputPerConsole-q.total)
	n = max(n, 0)
	q.dropped += len(b) - n
	if n > 0 {
		if !had {
			q.order = append(q.order, who)
		}
		q.queues[who] = append(cur, b[:n]...)
		q.total += n
	}
	q.mu.Unlock()
	if n > 0 {
		select {
		case q.ready <- struct{}{}:
		default:
		}
	}
}

// next takes the next turn's input (the first typist's, at most
// inputTurn bytes; the typist goes to the back), waiting for some; ok is
// false once done is closed.
func (q *inputQueue) next(done <-chan struct{}) ([]byte, bool) {
	for {
		q.mu.Lock()
		if len(q.order) > 0 {
			who := q.order[0]
			cur := q.queues[who]
			n := min(len(cur), inputTurn)
			b := append([]byte(nil), cur[:n]...)
			q.total -= n
			q.order = q.order[1:]
			if n == len(cur) {
				delete(q.queues, who)
			} else {
				q.queues[who] = cur[n:]
				q.order = append(q.order, who)
			}
			q.mu.Unlock()
			return b, true
		}
		q.mu.Unlock()
		select {
		case <-q.ready:
		case <-done:
			return nil, false
		}
	}
}

// drop empties every queue and returns how much it held.
func (q *inputQueue) drop() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := q.total
	q.queues, q.order, q.total = map[string][]byte{}, nil, 0
	return n
}

// takeDropped returns and clears the count of input that did not fit.
func (q *inputQueue) takeDropped() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := q.dropped
	q.dropped = 0
	return n
}

// Queued is how many bytes of input wait for the console.
func (h *Hub) Queued() int {
	h.input.mu.Lock()
	defer h.input.mu.Unlock()
	return h.input.total
}

// ConsolePing is how often a hub tells its viewers it is there;
// a viewer that hears nothing for ConsoleSilence gives up.
const (
	ConsolePing    = 5 * time.Second
	ConsoleSilence = 20 * time.Second
)

// keepalive pings the viewers every ConsolePing, so that they can tell a
// quiet guest from a worker that is gone.
func (h *Hub) keepalive() {
	t := time.NewTicker(ConsolePing)
	defer t.Stop()
	for {
		select {
		case <-h.done:
			return
		case <-t.C:
		}
		h.mu.Lock()
		off := h.offset
		h.mu.Unlock()
		m := nats.NewMsg(h.out)
		m.Header.Set(HdrOffset, strconv.FormatUint(off, 10))
		m.Header.Set(HdrPing, "1")
		_ = h.nc.PublishMsg(m)
	}
}

func (h *Hub) pump(onEnd func()) {
	defer onEnd()
	defer close(h.done)
	buf := make([]byte, chunkSize)
	for {
		n, err := h.conn.Read(buf)
		if n > 0 {
			h.mu.Lock()
			off := h.offset
			h.offset += uint64(n)
			h.ring = append(h.ring, buf[:n]...)
			if over := len(h.ring) - ReplaySize; over > 0 {
				h.ring = append(h.ring[:0], h.ring[over:]...)
			}
			h.mu.Unlock()
			m := nats.NewMsg(h.out)
			m.Header.Set(HdrOffset, strconv.FormatUint(off, 10))
			m.Data = append([]byte(nil), buf[:n]...)
			if perr := h.nc.PublishMsg(m); perr != nil {
				h.log.Debug("publishing console output failed", "err", perr)
			}
		}
		if err != nil {
			reason := "the console closed (the VM stopped)"
			if err != io.EOF {
				reason = "the console closed: " + err.Error()
			}
			_ = h.in.Unsubscribe()
			m := nats.NewMsg(h.out)
			h.mu.Lock()
			m.Header.Set(HdrOffset, strconv.FormatUint(h.offset, 10))
			h.mu.Unlock()
			m.Header.Set(HdrClosed, reason)
			_ = h.nc.PublishMsg(m)
			_ = h.conn.Close()
			return
		}
	}
}

// Replay returns the recent output and the offset just after it.
func (h *Hub) Replay() ([]byte, uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]byte(nil), h.ring...), h.offset
}

// Done is closed when the hub has ended.
func (h *Hub) Done() <-chan struct{} { return h.done }

// Close ends the hub (its viewers are told the console closed).
func (h *Hub) Close() {
	h.closeMu.Do(func() { _ = h.conn.Close() })
	<-h.done
}

// ViewerBuffer is how many output messages a viewer's client holds for
// it; beyond that its client drops output (and the viewer says how much
// it lost) instead of growing.
const ViewerBuffer = 256

// Console is the near end: a viewer of a VM's console. Read returns the
// replayed recent output, then live output (with a notice where output
// was lost because this viewer fell behind), and io.EOF once the console
// closes; Write types into the console.
type Console struct {
	nc      *nats.Conn
	sub     *nats.Subscription
	ch      chan *nats.Msg
	in      string
	inbox   string
	pending []byte
	next    uint64
	closed  error
	done    chan struct{}
	once    sync.Once
	heard   time.Time // the last message from the hub
	// Silence: Read gives up (ErrSilent) after this long without a word
	// from the hub (default ConsoleSilence).
	Silence time.Duration
	Lost    uint64 // bytes of output this viewer missed
}

// AttachConsole attaches to the console of vmName on host.
func AttachConsole(ctx context.Context, nc *nats.Conn, names api.Names, host, vmName string) (*Console, error) {
	c := &Console{nc: nc, ch: make(chan *nats.Msg, ViewerBuffer), in: names.Console(host, vmName, api.ConsoleIn),
		inbox: nc.NewRespInbox(), done: make(chan struct{})}
	// Subscribe first, so no output falls between the replay and the
	// first live message.
	// The channel bounds what waits for this viewer (a channel
	// subscription has no pending limits of its own: the client drops
	// what does not fit).
	sub, err := nc.ChanSubscribe(names.Console(host, vmName, api.ConsoleOut), c.ch)
	if err != nil {
		return nil, err
	}
	c.sub = sub
	rep, err := nc.RequestMsgWithContext(ctx, nats.NewMsg(names.Console(host, vmName, api.ConsoleAttach)))
	if err == nil {
		err = replyErr(rep)
	}
	if err != nil {
		_ = sub.Unsubscribe()
		return nil, requestErr("attaching to the console", err)
	}
	end, ok, herr := headerUint(rep.Header, HdrOffset)
	if herr != nil || !ok {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("attaching to the console: the worker's reply has no valid %s header", HdrOffset)
	}
	c.pending, c.next, c.heard, c.Silence = rep.Data, end, time.Now(), ConsoleSilence
	return c, nil
}

// Read returns console output.
func (c *Console) Read(p []byte) (int, error) {
	for len(c.pending) == 0 {
		if c.closed != nil {
			return 0, c.closed
		}
		select { // what is waiting first, however long ago the last was
		case m := <-c.ch:
			c.take(m)
			continue
		default:
		}
		select {
		case m := <-c.ch:
			c.take(m)
		case <-c.done:
			return 0, io.EOF
		case <-c.silence():
			return 0, ErrSilent
		}
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// ErrSilent: the VM's worker has not been heard from for ConsoleSilence
// (it stopped, or lost its connection); attach again.
var ErrSilent = errors.New("the console's worker has gone silent (stopped or disconnected); attach again")

// silence fires ConsoleSilence after the last message.
func (c *Console) silence() <-chan time.Time {
	return time.After(time.Until(c.heard.Add(c.Silence)))
}

// take folds one output message into what Read returns next.
func (c *Console) take(m *nats.Msg) {
	c.heard = time.Now()
	off, ok, err := headerUint(m.Header, HdrOffset)
	if err != nil || !ok {
		return
	}
	if off > c.next {
		lost := off - c.next
		c.Lost += lost
		c.pending = append(c.pending, fmt.Sprintf("\r\n[vmherd: %d bytes of console output lost: this viewer fell behind]\r\n", lost)...)
		c.next = off
	}
	data := m.Data
	if off < c.next { // already replayed
		skip := c.next - off
		if skip >= uint64(len(data)) {
			data = nil
		} else {
			data = data[skip:]
		}
	}
	c.pending = append(c.pending, data...)
	c.next += uint64(len(data))
	if reason := m.Header.Get(HdrClosed); reason != "" {
		c.closed = &ClosedError{Reason: reason}
	}
}

// ClosedError: the console ended.
type ClosedError struct{ Reason string }

func (e *ClosedError) Error() string { return e.Reason }

// Write types p into the console. The message's reply subject is this
// viewer's inbox (nothing answers): the hub queues input per typist.
func (c *Console) Write(p []byte) (int, error) {
	if err := c.nc.PublishRequest(c.in, c.inbox, append([]byte(nil), p...)); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close detaches; a Read in progress returns io.EOF.
func (c *Console) Close() error {
	var err error
	c.once.Do(func() {
		close(c.done)
		err = c.sub.Unsubscribe()
	})
	return err
}

// Dropped is how many output messages this viewer's client dropped.
func (c *Console) Dropped() int {
	n, _ := c.sub.Dropped()
	return n
}

// Buffered is how many output messages wait for this viewer.
func (c *Console) Buffered() int { return len(c.ch) }

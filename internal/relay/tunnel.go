package relay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/origin"
)

// A tunnel carries one TCP connection over two subjects, one per
// direction (api.TunnelUp: vmctl to the worker; TunnelDown: back).
// NATS delivers one publisher's messages to a subscriber in order, and
// drops them only for a subscriber that falls behind, so each side sends
// at most tunnelWindow bytes and tunnelFrames frames that the other has
// not acknowledged, and a gap in the frame numbers (which then means a
// lost message) ends the tunnel with an error rather than corrupting the
// stream.
//
// The receiving side holds the other to that: a data frame of more than
// tunnelChunk bytes, headers of more than tunnelMaxHeaders, a frame past
// the window or out of sequence ends the tunnel at once, and what the
// NATS client buffers before it is checked is bounded too (the
// subscription's pending limits), so a side that ignores the window
// costs the other at most about two windows, never what it sends.
const (
	tunnelChunk  = 32 << 10
	tunnelWindow = 1 << 20
	tunnelFrames = 256
	// the receiver acknowledges every quarter window
	tunnelAckBytes  = tunnelWindow / 4
	tunnelAckFrames = tunnelFrames / 4
	// tunnelMaxHeaders bounds the headers of one frame (keys and values).
	tunnelMaxHeaders = 1 << 10
	// What the NATS client may buffer for a tunnel's subscription before
	// its callback has seen it: a window of frames with their headers and
	// room for acknowledgements and pings. Past it the client drops
	// messages, and the gap ends the tunnel.
	tunnelPendingMsgs  = 2 * tunnelFrames
	tunnelPendingBytes = tunnelWindow + tunnelFrames*tunnelMaxHeaders/4
	// liveness: each side pings this often, and gives up on a peer
	// silent for tunnelIdle
	tunnelPing = 5 * time.Second
	tunnelIdle = 20 * time.Second
)

// TunnelWriteTimeout is how long the worker waits for a guest to read
// what its tunnel carries; a guest that reads nothing for that long (a
// suspended VM, a stuck server) ends the tunnel, so what waits for it is
// given back.
const TunnelWriteTimeout = 30 * time.Second

// NewTunnelID returns a fresh tunnel id (a subject token).
func NewTunnelID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// ValidTunnelID: what NewTunnelID makes.
func ValidTunnelID(id string) bool {
	if len(id) != 24 {
		return false
	}
	_, err := hex.DecodeString(id)
	return err == nil && strings.ToLower(id) == id
}

// newTunnelKey is a tunnel's key: the worker gives it in the open's
// reply, and takes only the frames that carry it.
func newTunnelKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// halfCloser is a connection that can end its sending side (TCP).
type halfCloser interface{ CloseWrite() error }

// writeDeadliner is a connection whose writes can be given a deadline.
type writeDeadliner interface{ SetWriteDeadline(time.Time) error }

// errPeerDone: the other side closed the tunnel after both sides' data
// ended.
var errPeerDone = errors.New("closed by the other side")

// tunnel is one side of a tunnel: what it reads from its connection goes
// to send, what arrives on its subscription is checked (size, key,
// sequence, window) as it arrives, queued (at most a window), and
// written to its connection by one goroutine, with a deadline.
type tunnel struct {
	nc   *nats.Conn
	send string
	// sendKey goes on every frame sent (the client's side); recvKey must
	// be on every frame received ("": any), others are dropped.
	sendKey, recvKey string
	// writeTimeout bounds each write to the connection (0: none).
	writeTimeout time.Duration

	sub  *nats.Subscription
	slow <-chan nats.SubStatus // the client dropped a message
	data chan *nats.Msg        // data frames, then the EOF and close marks

	mu sync.Mutex
	// sending
	sentB, sentF   uint64
	ackedB, ackedF uint64
	lastPublish    time.Time
	// receiving
	expect         uint64 // the next data frame's number
	recvB, recvF   uint64 // data taken
	myAckB, myAckF uint64 // acknowledged to the other side
	heard          time.Time
	sawEOF, sawEnd bool
	// the end
	err      error
	ended    chan struct{}
	endOnce  sync.Once
	acked    chan struct{}
	unsubbed bool
}

// subscribeTunnel subscribes to recv, the other side's frames, before the
// tunnel runs (so none is missed).
func subscribeTunnel(nc *nats.Conn, recv, send, sendKey, recvKey string, writeTimeout time.Duration) (*tunnel, error) {
	t := &tunnel{
		nc: nc, send: send, sendKey: sendKey, recvKey: recvKey, writeTimeout: writeTimeout,
		data:  make(chan *nats.Msg, tunnelFrames+2),
		ended: make(chan struct{}), acked: make(chan struct{}, 1), heard: time.Now(),
	}
	sub, err := nc.Subscribe(recv, t.deliver)
	if err != nil {
		return nil, err
	}
	if err := sub.SetPendingLimits(tunnelPendingMsgs, tunnelPendingBytes); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("tunnel: bounding the subscription: %w", err)
	}
	t.sub = sub
	t.slow = sub.StatusChanged(nats.SubscriptionSlowConsumer)
	return t, nil
}

// end ends the tunnel once, with err (errPeerDone: cleanly).
func (t *tunnel) end(err error) {
	t.endOnce.Do(func() {
		t.mu.Lock()
		t.err = err
		t.mu.Unlock()
		close(t.ended)
	})
}

func (t *tunnel) endErr() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.err
}

func (t *tunnel) unsubscribe() {
	t.mu.Lock()
	done := t.unsubbed
	t.unsubbed = true
	t.mu.Unlock()
	if !done {
		_ = t.sub.Unsubscribe()
	}
}

// headerSize is the bytes of a message's header keys and values.
func headerSize(h nats.Header) int {
	n := 0
	for k, vs := range h {
		n += len(k)
		for _, v := range vs {
			n += len(v)
		}
	}
	return n
}

// deliver takes one frame from the other side, in the subscription's
// goroutine: it never blocks, and holds back at most the window.
func (t *tunnel) deliver(m *nats.Msg) {
	select {
	case <-t.ended:
		return
	default:
	}
	if err := droppedErr(m.Sub); err != nil {
		t.fail(err)
		return
	}
	h := m.Header
	if origin.Relayed(m.Reply, h) {
		return // delivered by the server on someone's behalf, not the peer's
	}
	if t.recvKey != "" && h.Get(HdrKey) != t.recvKey {
		return // not from whoever opened the tunnel: it holds no key
	}
	if len(m.Data) > tunnelChunk {
		t.fail(fmt.Errorf("tunnel: a frame of %d bytes arrived, more than %d", len(m.Data), tunnelChunk))
		return
	}
	if n := headerSize(h); n > tunnelMaxHeaders {
		t.fail(fmt.Errorf("tunnel: a frame with %d bytes of headers arrived, more than %d", n, tunnelMaxHeaders))
		return
	}
	t.mu.Lock()
	t.heard = time.Now()
	t.mu.Unlock()
	switch {
	case h.Get(HdrClosed) != "":
		if r := h.Get(HdrClosed); r != "done" {
			t.fail(fmt.Errorf("tunnel closed by the other side: %s", r))
			return
		}
		t.mark(m, &t.sawEnd) // after the data before it
	case h.Get(HdrAck) != "":
		var b, f uint64
		if _, err := fmt.Sscanf(h.Get(HdrAck), "%d,%d", &b, &f); err != nil {
			t.fail(fmt.Errorf("tunnel: bad %s header %q", HdrAck, h.Get(HdrAck)))
			return
		}
		t.mu.Lock()
		t.ackedB, t.ackedF = max(t.ackedB, min(b, t.sentB)), max(t.ackedF, min(f, t.sentF))
		t.mu.Unlock()
		select {
		case t.acked <- struct{}{}:
		default:
		}
	case h.Get(HdrEOF) != "":
		t.mark(m, &t.sawEOF)
	case h.Get(HdrSeq) != "":
		seq, _, err := headerUint(h, HdrSeq)
		if err != nil {
			t.fail(fmt.Errorf("tunnel: %w", err))
			return
		}
		n := uint64(len(m.Data))
		t.mu.Lock()
		var bad error
		switch {
		case t.sawEOF:
			bad = fmt.Errorf("tunnel: frame %d arrived after the other side's end of data", seq)
		case seq != t.expect:
			bad = fmt.Errorf("tunnel: frame %d arrived where %d was due (lost in transit)", seq, t.expect)
		case t.recvB+n-t.myAckB > tunnelWindow || t.recvF+1-t.myAckF > tunnelFrames:
			bad = fmt.Errorf("tunnel: frame %d goes past the window (%d bytes, %d frames unacknowledged): the other side does not wait for acknowledgements",
				seq, t.recvB+n-t.myAckB, t.recvF+1-t.myAckF)
		default:
			t.expect++
			t.recvB += n
			t.recvF++
		}
		t.mu.Unlock()
		if bad != nil {
			t.fail(bad)
			return
		}
		t.data <- m // the window leaves room
	}
}

// droppedErr says why the tunnel must end if the NATS client dropped
// some of its messages (past the pending limits): a frame is lost.
func droppedErr(sub *nats.Subscription) error {
	if sub == nil {
		return nil
	}
	if n, _ := sub.Dropped(); n > 0 {
		return fmt.Errorf("tunnel: %d messages were dropped: the other side sent more than the window allows", n)
	}
	return nil
}

// mark queues the other side's EOF or close (once each) behind its data.
func (t *tunnel) mark(m *nats.Msg, seen *bool) {
	t.mu.Lock()
	dup := *seen
	*seen = true
	t.mu.Unlock()
	if !dup {
		t.data <- m // two places are kept for the marks
	}
}

// fail ends the tunnel with err and stops taking frames.
func (t *tunnel) fail(err error) {
	t.end(err)
	t.unsubscribe()
}

func (t *tunnel) publish(m *nats.Msg) error {
	if t.sendKey != "" {
		m.Header.Set(HdrKey, t.sendKey)
	}
	t.mu.Lock()
	t.lastPublish = time.Now()
	t.mu.Unlock()
	return t.nc.PublishMsg(m)
}

// run splices rw and the tunnel until both sides have ended their data,
// an error, or ctx ends (then the other side is told the tunnel closed).
// It closes rw and the subscription, and tells the other side why it
// ended.
func (t *tunnel) run(ctx context.Context, rw io.ReadWriteCloser) error {
	defer t.unsubscribe()
	localDone := make(chan struct{})
	outDone := make(chan struct{})
	go func() {
		defer close(outDone)
		err := t.outbound(rw)
		close(localDone)
		if err != nil {
			t.end(err)
		}
	}()
	inDone := make(chan struct{})
	go func() {
		defer close(inDone)
		// inbound returns once both sides' data has ended (nil), or
		// on an error: either way the tunnel is over.
		t.end(t.inbound(rw, localDone))
	}()
	stopped := false
	select {
	case <-t.ended:
	case <-ctx.Done():
		stopped = true
		t.end(fmt.Errorf("tunnel: %w", context.Cause(ctx)))
	}
	// Whatever reads or writes rw now returns.
	_ = rw.Close()
	<-outDone
	<-inDone
	err := t.endErr()
	reason := "done"
	switch {
	case errors.Is(err, errPeerDone):
		return nil // the other side knows
	case err != nil:
		reason = err.Error()
	}
	m := nats.NewMsg(t.send)
	m.Header.Set(HdrClosed, reason)
	_ = t.publish(m)
	if stopped {
		return nil // asked to stop: not a failure of the tunnel
	}
	return err
}

// outbound sends what rw reads, within the window.
func (t *tunnel) outbound(rw io.Reader) error {
	buf := make([]byte, tunnelChunk)
	var seq uint64
	for {
		n, rerr := rw.Read(buf)
		if n > 0 {
			if err := t.waitWindow(n); err != nil {
				return nil // ended meanwhile
			}
			m := nats.NewMsg(t.send)
			m.Header.Set(HdrSeq, strconv.FormatUint(seq, 10))
			m.Data = append([]byte(nil), buf[:n]...)
			seq++
			if err := t.publish(m); err != nil {
				return fmt.Errorf("tunnel: sending: %w", err)
			}
		}
		if rerr != nil {
			select {
			case <-t.ended:
				return nil // ended, and rw closed for it
			default:
			}
			if !errors.Is(rerr, io.EOF) {
				return fmt.Errorf("tunnel: reading: %w", rerr)
			}
			m := nats.NewMsg(t.send)
			m.Header.Set(HdrEOF, strconv.FormatUint(seq, 10))
			return t.publish(m)
		}
	}
}

// waitWindow waits until n more bytes (one frame) fit in the window.
func (t *tunnel) waitWindow(n int) error {
	for {
		t.mu.Lock()
		fits := t.sentB-t.ackedB+uint64(n) <= tunnelWindow && t.sentF-t.ackedF < tunnelFrames
		if fits {
			t.sentB += uint64(n)
			t.sentF++
		}
		t.mu.Unlock()
		if fits {
			return nil
		}
		select {
		case <-t.acked:
		case <-t.ended:
			return errors.New("tunnel: closed")
		}
	}
}

// inbound writes the other side's data to rw, acknowledges it, and keeps
// the tunnel alive, until the other side's data has ended and ours too
// (localDone), or the tunnel ends.
func (t *tunnel) inbound(rw io.Writer, localDone chan struct{}) error {
	var wroteB, wroteF uint64
	peerEOF, local := false, localDone
	ping := time.NewTicker(tunnelPing)
	defer ping.Stop()
	ack := func() error {
		m := nats.NewMsg(t.send)
		t.mu.Lock()
		// Raised before it is sent: the other side may use it at once.
		t.myAckB, t.myAckF = wroteB, wroteF
		t.mu.Unlock()
		m.Header.Set(HdrAck, fmt.Sprintf("%d,%d", wroteB, wroteF))
		return t.publish(m)
	}
	wd, _ := rw.(writeDeadliner)
	for {
		select {
		case <-t.ended:
			return nil
		case <-local:
			if peerEOF {
				return nil
			}
			local = nil
			continue
		case <-t.slow:
			// Past the pending limits: a frame is lost, and the rest
			// of what the other side sends should not be read.
			if err := droppedErr(t.sub); err != nil {
				return err
			}
			return errors.New("tunnel: messages were dropped: the other side sent more than the window allows")
		case <-ping.C:
			t.mu.Lock()
			quiet := time.Since(t.lastPublish) >= tunnelPing
			silent := time.Since(t.heard)
			t.mu.Unlock()
			if err := droppedErr(t.sub); err != nil {
				return err
			}
			if silent > tunnelIdle {
				return fmt.Errorf("tunnel: the other side has been silent for %s", silent.Round(time.Second))
			}
			if quiet {
				m := nats.NewMsg(t.send)
				m.Header.Set(HdrPing, "1")
				_ = t.publish(m)
			}
			continue
		case m := <-t.data:
			h := m.Header
			switch {
			case h.Get(HdrClosed) != "":
				t.end(errPeerDone)
				return nil
			case h.Get(HdrEOF) != "":
				if hc, ok := rw.(halfCloser); ok {
					_ = hc.CloseWrite()
				}
				peerEOF = true
				if local == nil {
					return nil
				}
				continue
			}
			if wd != nil && t.writeTimeout > 0 {
				_ = wd.SetWriteDeadline(time.Now().Add(t.writeTimeout))
			}
			if _, err := rw.Write(m.Data); err != nil {
				select {
				case <-t.ended:
					return nil // closed for the end
				default:
				}
				if errors.Is(err, os.ErrDeadlineExceeded) {
					return fmt.Errorf("tunnel: the guest read nothing for %s", t.writeTimeout)
				}
				return fmt.Errorf("tunnel: writing: %w", err)
			}
			wroteB += uint64(len(m.Data))
			wroteF++
			t.mu.Lock()
			due := wroteB-t.myAckB >= tunnelAckBytes || wroteF-t.myAckF >= tunnelAckFrames
			t.mu.Unlock()
			if due {
				if err := ack(); err != nil {
					return err
				}
			}
		}
	}
}

// DialTunnel opens a tunnel to TCP port on vmName's guest, through the
// worker of its host, and splices it to rw until either side ends.
func DialTunnel(ctx context.Context, nc *nats.Conn, names api.Names, host, vmName string, port int, rw io.ReadWriteCloser) error {
	t, err := OpenTunnel(ctx, nc, names, host, vmName, port)
	if err != nil {
		_ = rw.Close()
		return err
	}
	return t.Splice(ctx, rw)
}

// OpenTunnel opens a tunnel to TCP port on vmName's guest through the
// worker of its host; Splice then carries it.
func OpenTunnel(ctx context.Context, nc *nats.Conn, names api.Names, host, vmName string, port int) (*OpenedTunnel, error) {
	id := NewTunnelID()
	t, err := subscribeTunnel(nc, names.Tunnel(host, vmName, id, api.TunnelDown), names.Tunnel(host, vmName, id, api.TunnelUp), "", "", 0)
	if err != nil {
		return nil, err
	}
	req := nats.NewMsg(names.Tunnel(host, vmName, id, api.TunnelOpen))
	req.Header.Set(HdrPort, strconv.Itoa(port))
	octx, cancel := context.WithTimeout(ctx, 15*time.Second)
	rep, err := nc.RequestMsgWithContext(octx, req)
	cancel()
	if err == nil {
		err = replyErr(rep)
	}
	if err != nil {
		t.unsubscribe()
		return nil, requestErr(fmt.Sprintf("opening a tunnel to %s port %d", vmName, port), err)
	}
	t.sendKey = rep.Header.Get(HdrKey)
	return &OpenedTunnel{t: t}, nil
}

// OpenedTunnel is a tunnel the worker accepted.
type OpenedTunnel struct{ t *tunnel }

// Splice carries the tunnel to and from rw until either side ends (or
// ctx), and closes rw.
func (o *OpenedTunnel) Splice(ctx context.Context, rw io.ReadWriteCloser) error {
	return o.t.run(ctx, rw)
}

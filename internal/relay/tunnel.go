package relay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/origin"
)

// A tunnel carries one TCP connection over two subjects, one per
// direction (events.TunnelUp: vmctl to the worker; TunnelDown: back).
// NATS delivers one publisher's messages to a subscriber in order, and
// drops them only for a subscriber that falls behind, so each side sends
// at most tunnelWindow bytes and tunnelFrames frames that the other has
// not acknowledged: the receiver's buffer never overflows, and a gap in
// the frame numbers (which then means a lost message) ends the tunnel
// with an error rather than corrupting the stream.
const (
	tunnelChunk  = 32 << 10
	tunnelWindow = 1 << 20
	tunnelFrames = 256
	// the receiver acknowledges every quarter window
	tunnelAckBytes  = tunnelWindow / 4
	tunnelAckFrames = tunnelFrames / 4
	// liveness: each side pings this often, and gives up on a peer
	// silent for tunnelIdle
	tunnelPing = 10 * time.Second
	tunnelIdle = 35 * time.Second
)

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

// halfCloser is a connection that can end its sending side (TCP).
type halfCloser interface{ CloseWrite() error }

// Splice runs a tunnel between rw and the subject pair: what rw reads is
// published to send, what arrives on recv is written to rw, until both
// sides have ended their data or an error. It closes rw.
func Splice(ctx context.Context, nc *nats.Conn, send string, recv chan *nats.Msg, rw io.ReadWriteCloser) error {
	s := &splice{nc: nc, send: send, rw: rw, acked: make(chan struct{}, 1), stop: make(chan struct{})}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 2)
	localDone := make(chan struct{})
	go func() {
		err := s.outbound(ctx)
		close(localDone)
		errc <- err
	}()
	go func() { errc <- s.inbound(ctx, recv, localDone) }()
	var err error
	for range 2 {
		if e := <-errc; e != nil && err == nil {
			err = e
			cancel()
			s.halt()
			_ = rw.Close()
		}
	}
	_ = rw.Close()
	reason := "done"
	if err != nil {
		reason = err.Error()
	}
	m := nats.NewMsg(send)
	m.Header.Set(HdrClosed, reason)
	_ = nc.PublishMsg(m)
	return err
}

type splice struct {
	nc   *nats.Conn
	send string
	rw   io.ReadWriteCloser

	mu             sync.Mutex
	sentB, sentF   uint64
	ackedB, ackedF uint64
	acked          chan struct{}
	stop           chan struct{}
	stopOnce       sync.Once
	lastPublish    time.Time
}

func (s *splice) halt() { s.stopOnce.Do(func() { close(s.stop) }) }

func (s *splice) publish(m *nats.Msg) error {
	s.mu.Lock()
	s.lastPublish = time.Now()
	s.mu.Unlock()
	return s.nc.PublishMsg(m)
}

// outbound sends what rw reads, within the window.
func (s *splice) outbound(ctx context.Context) error {
	buf := make([]byte, tunnelChunk)
	var seq uint64
	for {
		n, rerr := s.rw.Read(buf)
		if n > 0 {
			if err := s.waitWindow(ctx, n); err != nil {
				return err
			}
			m := nats.NewMsg(s.send)
			m.Header.Set(HdrSeq, strconv.FormatUint(seq, 10))
			m.Data = append([]byte(nil), buf[:n]...)
			seq++
			if err := s.publish(m); err != nil {
				return fmt.Errorf("tunnel: sending: %w", err)
			}
		}
		if rerr != nil {
			select {
			case <-s.stop:
				return nil // ended from the other side
			default:
			}
			if !errors.Is(rerr, io.EOF) {
				return fmt.Errorf("tunnel: reading: %w", rerr)
			}
			m := nats.NewMsg(s.send)
			m.Header.Set(HdrEOF, strconv.FormatUint(seq, 10))
			return s.publish(m)
		}
	}
}

// waitWindow waits until n more bytes (one frame) fit in the window.
func (s *splice) waitWindow(ctx context.Context, n int) error {
	for {
		s.mu.Lock()
		fits := s.sentB-s.ackedB+uint64(n) <= tunnelWindow && s.sentF-s.ackedF < tunnelFrames
		if fits {
			s.sentB += uint64(n)
			s.sentF++
		}
		s.mu.Unlock()
		if fits {
			return nil
		}
		select {
		case <-s.acked:
		case <-s.stop:
			return errors.New("tunnel: closed")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// inbound writes what arrives to rw, acknowledges it, takes the other
// side's acknowledgements, and keeps the tunnel alive, until the other
// side's data has ended and ours too (localDone).
func (s *splice) inbound(ctx context.Context, recv chan *nats.Msg, localDone chan struct{}) error {
	var expect, gotB, gotF, ackB, ackF uint64
	peerEOF, local := false, localDone
	ping := time.NewTicker(tunnelPing)
	defer ping.Stop()
	idle := time.NewTimer(tunnelIdle)
	defer idle.Stop()
	ack := func() error {
		m := nats.NewMsg(s.send)
		m.Header.Set(HdrAck, fmt.Sprintf("%d,%d", gotB, gotF))
		ackB, ackF = gotB, gotF
		return s.publish(m)
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-local:
			if peerEOF {
				return nil
			}
			local = nil
			continue
		case <-ping.C:
			s.mu.Lock()
			quiet := time.Since(s.lastPublish) >= tunnelPing
			s.mu.Unlock()
			if quiet {
				m := nats.NewMsg(s.send)
				m.Header.Set(HdrPing, "1")
				_ = s.publish(m)
			}
			continue
		case <-idle.C:
			return fmt.Errorf("tunnel: the other side has been silent for %s", tunnelIdle)
		case m := <-recv:
			if origin.Relayed(m.Reply, m.Header) {
				continue // delivered by the server on someone's behalf, not the peer's
			}
			idle.Reset(tunnelIdle)
			h := m.Header
			switch {
			case h.Get(HdrClosed) != "":
				if r := h.Get(HdrClosed); r != "done" {
					return fmt.Errorf("tunnel closed by the other side: %s", r)
				}
				s.halt()
				_ = s.rw.Close()
				return nil
			case h.Get(HdrAck) != "":
				var b, f uint64
				if _, err := fmt.Sscanf(h.Get(HdrAck), "%d,%d", &b, &f); err != nil {
					return fmt.Errorf("tunnel: bad %s header %q", HdrAck, h.Get(HdrAck))
				}
				s.mu.Lock()
				s.ackedB, s.ackedF = max(s.ackedB, b), max(s.ackedF, f)
				s.mu.Unlock()
				select {
				case s.acked <- struct{}{}:
				default:
				}
			case h.Get(HdrEOF) != "":
				if hc, ok := s.rw.(halfCloser); ok {
					_ = hc.CloseWrite()
				}
				peerEOF = true
				if local == nil {
					return nil
				}
			case h.Get(HdrSeq) != "":
				seq, _, err := headerUint(h, HdrSeq)
				if err != nil {
					return err
				}
				if seq != expect {
					return fmt.Errorf("tunnel: frame %d arrived where %d was due (lost in transit)", seq, expect)
				}
				expect++
				if _, err := s.rw.Write(m.Data); err != nil {
					return fmt.Errorf("tunnel: writing: %w", err)
				}
				gotB += uint64(len(m.Data))
				gotF++
				if gotB-ackB >= tunnelAckBytes || gotF-ackF >= tunnelAckFrames {
					if err := ack(); err != nil {
						return err
					}
				}
			}
		}
	}
}

// TunnelBuffer is the receive buffer of a tunnel's subscription: the
// window's frames, its acknowledgements and pings.
const TunnelBuffer = 2*tunnelFrames + 16

// DialTunnel opens a tunnel to TCP port on vmName's guest, through the
// worker of its host, and splices it to rw until either side ends.
func DialTunnel(ctx context.Context, nc *nats.Conn, names events.Names, host, vmName string, port int, rw io.ReadWriteCloser) error {
	id := NewTunnelID()
	down := make(chan *nats.Msg, TunnelBuffer)
	sub, err := nc.ChanSubscribe(names.Tunnel(host, vmName, id, events.TunnelDown), down)
	if err != nil {
		return err
	}
	defer func() { _ = sub.Unsubscribe() }()
	_ = sub.SetPendingLimits(TunnelBuffer, TunnelBuffer*tunnelChunk)
	req := nats.NewMsg(names.Tunnel(host, vmName, id, events.TunnelOpen))
	req.Header.Set(HdrPort, strconv.Itoa(port))
	octx, cancel := context.WithTimeout(ctx, 15*time.Second)
	rep, err := nc.RequestMsgWithContext(octx, req)
	cancel()
	if err == nil {
		err = replyErr(rep)
	}
	if err != nil {
		_ = rw.Close()
		return requestErr(fmt.Sprintf("opening a tunnel to %s port %d", vmName, port), err)
	}
	return Splice(ctx, nc, names.Tunnel(host, vmName, id, events.TunnelUp), down, rw)
}

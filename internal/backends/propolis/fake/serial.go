package fake

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/coder/websocket"

	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
)

// serialClient is one WebSocket attached to the serial console.
type serialClient struct {
	conn *websocket.Conn
	out  chan frame
	done chan struct{}
	once sync.Once
}

type frame struct {
	typ  websocket.MessageType
	data []byte
}

// send queues a frame; a client too slow to keep up loses output, as a
// UART overrun would.
func (c *serialClient) send(f frame) {
	select {
	case c.out <- f:
	default:
	}
}

// close ends the client without blocking the caller (which may hold the
// server's lock) on the close handshake.
func (c *serialClient) close(code websocket.StatusCode, reason string) {
	c.once.Do(func() {
		close(c.done)
		go func() { _ = c.conn.Close(code, reason) }()
	})
}

func (c *serialClient) writeLoop() {
	for {
		select {
		case f := <-c.out:
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err := c.conn.Write(ctx, f.typ, f.data)
			cancel()
			if err != nil {
				return
			}
		case <-c.done:
			return
		}
	}
}

// offsets reads from_start, most_recent and max_bytes.
func offsets(r *http.Request) (fromStart, mostRecent, maxBytes *uint64, err error) {
	q := r.URL.Query()
	get := func(name string) (*uint64, error) {
		v := q.Get(name)
		if v == "" {
			return nil, nil
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("unable to parse query string: %s: %v", name, err)
		}
		return &n, nil
	}
	if fromStart, err = get("from_start"); err != nil {
		return
	}
	if mostRecent, err = get("most_recent"); err != nil {
		return
	}
	maxBytes, err = get("max_bytes")
	return
}

// historyFrom returns the buffered bytes a query selects and the absolute
// offset of the first one.
func historyFrom(buf []byte, fromStart, mostRecent, maxBytes *uint64) ([]byte, uint64) {
	n := uint64(len(buf))
	start := uint64(0)
	switch {
	case fromStart != nil:
		start = min(*fromStart, n)
	case mostRecent != nil:
		start = n - min(*mostRecent, n)
	}
	data := buf[start:]
	if maxBytes != nil && uint64(len(data)) > *maxBytes {
		data = data[:*maxBytes]
	}
	return append([]byte(nil), data...), start
}

func (s *Server) activeLocked() *instance {
	if s.inst == nil || s.inst.final {
		return nil
	}
	return s.inst
}

func (s *Server) serialHistory(w http.ResponseWriter, r *http.Request) {
	fromStart, mostRecent, maxBytes, err := offsets(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, "", err.Error())
		return
	}
	if (fromStart == nil) == (mostRecent == nil) {
		writeError(w, http.StatusBadRequest, "", "Exactly one of 'from_start' or 'most_recent' must be specified.")
		return
	}
	s.mu.Lock()
	in := s.activeLocked()
	if in == nil {
		s.mu.Unlock()
		noInstance(w)
		return
	}
	data, start := historyFrom(in.serial, fromStart, mostRecent, maxBytes)
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, papi.SerialHistory{Data: data, LastByteOffset: start + uint64(len(data))})
}

func (s *Server) serial(w http.ResponseWriter, r *http.Request) {
	fromStart, mostRecent, _, err := offsets(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, "", err.Error())
		return
	}
	s.mu.Lock()
	in := s.activeLocked()
	s.mu.Unlock()
	if in == nil {
		noInstance(w)
		return
	}
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		return // Accept answered the client
	}
	conn.SetReadLimit(1 << 20)
	c := &serialClient{conn: conn, out: make(chan frame, 4096), done: make(chan struct{})}
	s.mu.Lock()
	if s.activeLocked() != in || s.Dead() {
		s.mu.Unlock()
		_ = conn.CloseNow()
		return
	}
	// Replay and registration happen under one lock, so no byte is sent
	// twice or lost between them.
	if fromStart != nil || mostRecent != nil {
		if data, _ := historyFrom(in.serial, fromStart, mostRecent, nil); len(data) > 0 {
			c.send(frame{websocket.MessageBinary, data})
		}
	}
	in.clients[c] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(in.clients, c)
		s.mu.Unlock()
		c.close(websocket.StatusNormalClosure, "")
	}()
	go c.writeLoop()
	for {
		typ, data, err := conn.Read(context.Background())
		if err != nil {
			return
		}
		if typ != websocket.MessageBinary {
			continue // text frames are control messages; none are expected from clients
		}
		s.mu.Lock()
		s.input = append(s.input, data...)
		if s.opts.Echo && s.activeLocked() == in {
			s.outputLocked(in, data)
		}
		s.mu.Unlock()
	}
}

func (s *Server) outputLocked(in *instance, p []byte) {
	in.serial = append(in.serial, p...)
	for c := range in.clients {
		c.send(frame{websocket.MessageBinary, append([]byte(nil), p...)})
	}
}

// ErrNoActiveInstance: the serial console needs an instance that has not
// run down.
var ErrNoActiveInstance = errors.New("fake propolis-server: no active instance")

// WriteSerial makes the guest write p to its UART (com1).
func (s *Server) WriteSerial(p []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.activeLocked()
	if in == nil {
		return ErrNoActiveInstance
	}
	s.outputLocked(in, p)
	return nil
}

// SendControl sends a text (control) frame to every attached console.
func (s *Server) SendControl(msg string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.activeLocked()
	if in == nil {
		return ErrNoActiveInstance
	}
	for c := range in.clients {
		c.send(frame{websocket.MessageText, []byte(msg)})
	}
	return nil
}

// SerialInput returns every byte the consoles have sent to the guest.
func (s *Server) SerialInput() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.input...)
}

// SerialClients counts the consoles attached to the current instance.
func (s *Server) SerialClients() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inst == nil {
		return 0
	}
	return len(s.inst.clients)
}

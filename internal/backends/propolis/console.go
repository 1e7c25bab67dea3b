package propolis

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
)

// consoleReplay is how much recent output a new console session shows.
const consoleReplay = 4096

// ConsoleKind: propolis-server serves its consoles over WebSockets.
func (b *Backend) ConsoleKind() api.ConsoleKind { return api.ConsoleWebSocket }

var _ backends.ConsoleDialer = (*Backend)(nil)

// DialConsole attaches to the serial console propolis-server serves
// over a WebSocket: binary frames carry the UART's bytes both ways,
// text frames carry JSON control messages, which are not console output.
func (b *Backend) DialConsole(ctx context.Context, ep api.ConsoleEndpoint) (io.ReadWriteCloser, error) {
	if ep.Kind != api.ConsoleWebSocket {
		return nil, fmt.Errorf("propolis: console kind %q is not a WebSocket", ep.Kind)
	}
	u, err := url.Parse(ep.URL)
	if err != nil {
		return nil, fmt.Errorf("console endpoint %q: %w", ep.URL, err)
	}
	if u.RawQuery == "" {
		// Show what the guest printed just before we attached.
		u.RawQuery = url.Values{"most_recent": {fmt.Sprint(consoleReplay)}}.Encode()
	}
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	conn, resp, err := websocket.Dial(dctx, u.String(), &websocket.DialOptions{HTTPHeader: consoleHeaders(ep)})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			aerr := papi.DecodeError(u.Host, http.MethodGet, u.Path, resp)
			if resp.StatusCode == http.StatusFailedDependency {
				return nil, fmt.Errorf("attaching to the serial console: the VM's propolis instance is not running (start the VM first): %w", aerr)
			}
			return nil, fmt.Errorf("attaching to the serial console: %w", aerr)
		}
		return nil, fmt.Errorf("connecting to the serial console at %s: %w (the worker must reach the VM's propolis-server)", u.Redacted(), err)
	}
	conn.SetReadLimit(4 << 20)
	return newWSConsole(conn), nil
}

// consoleHeaders are the endpoint's headers, with the API version the
// server requires on the upgrade request.
func consoleHeaders(ep api.ConsoleEndpoint) http.Header {
	h := http.Header{}
	for k, v := range ep.Headers {
		h.Set(k, v)
	}
	if h.Get(papi.VersionHeader) == "" {
		h.Set(papi.VersionHeader, papi.Version)
	}
	return h
}

// wsConsole is a serial console WebSocket as a byte stream.
type wsConsole struct {
	conn *websocket.Conn

	rmu  sync.Mutex
	rbuf []byte // the unread rest of the last binary frame

	closeOnce sync.Once
	closed    chan struct{}
	closeErr  error
}

func newWSConsole(conn *websocket.Conn) *wsConsole {
	return &wsConsole{conn: conn, closed: make(chan struct{})}
}

func (c *wsConsole) isClosed() bool {
	select {
	case <-c.closed:
		return true
	default:
		return false
	}
}

// Read returns console output. Text frames are control messages (such as
// a migration notice), not output, and are skipped.
func (c *wsConsole) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for len(c.rbuf) == 0 {
		typ, data, err := c.conn.Read(context.Background())
		if err != nil {
			switch {
			case websocket.CloseStatus(err) == websocket.StatusNormalClosure,
				websocket.CloseStatus(err) == websocket.StatusGoingAway,
				c.isClosed():
				return 0, io.EOF
			}
			return 0, fmt.Errorf("reading the serial console: %w", err)
		}
		if typ == websocket.MessageBinary {
			c.rbuf = data
		}
	}
	n := copy(p, c.rbuf)
	c.rbuf = c.rbuf[n:]
	return n, nil
}

// Write sends keystrokes to the guest in one binary frame.
func (c *wsConsole) Write(p []byte) (int, error) {
	if c.isClosed() {
		return 0, io.ErrClosedPipe
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.conn.Write(ctx, websocket.MessageBinary, p); err != nil {
		return 0, fmt.Errorf("writing to the serial console: %w", err)
	}
	return len(p), nil
}

// Close ends the session with a close handshake.
func (c *wsConsole) Close() error {
	c.closeOnce.Do(func() {
		close(c.closed)
		err := c.conn.Close(websocket.StatusNormalClosure, "detached")
		if err != nil && websocket.CloseStatus(err) != websocket.StatusNormalClosure && !errors.Is(err, net.ErrClosed) {
			c.closeErr = err
		}
	})
	return c.closeErr
}

// ConsoleHistory reads the console output propolis-server keeps for the
// VM's instance (GET /instance/serial/history): from byte offset from
// (hasFrom), or all of it; next is the offset after what it returns.
func (b *Backend) ConsoleHistory(ctx context.Context, ep api.ConsoleEndpoint, from uint64, hasFrom bool) (data []byte, next uint64, err error) {
	u, err := url.Parse(ep.URL)
	if err != nil {
		return nil, 0, fmt.Errorf("console endpoint %q: %w", ep.URL, err)
	}
	c := papi.New(u.Host)
	all := uint64(1 << 30)
	q := papi.HistoryQuery{MostRecent: &all}
	if hasFrom {
		q = papi.HistoryQuery{FromStart: &from}
	}
	h, err := c.SerialHistory(ctx, q)
	if err != nil {
		if papi.StatusOf(err) == http.StatusFailedDependency {
			return nil, 0, fmt.Errorf("no console log: the VM's propolis instance is not running, and propolis-server keeps the log only while it runs: %w", err)
		}
		return nil, 0, fmt.Errorf("reading the console log: %w", err)
	}
	return h.Data, h.LastByteOffset, nil
}

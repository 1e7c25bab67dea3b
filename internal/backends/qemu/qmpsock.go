package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// maxQMPLine bounds one line QEMU sends on the QMP socket (a reply or an
// event): the largest this backend asks for (query-blockstats of a VM
// with a few disks, query-cpus-fast) is a few KiB.
const maxQMPLine = 8 << 20

// sockMonitor is a qmp.Monitor on QEMU's QMP unix socket, used instead of
// go-qemu's qmp.SocketMonitor. That one hands Run the line its reader
// goroutine scanned without copying it, and goes on scanning into the
// same buffer: an event that arrives right after a reply overwrites the
// reply while Run decodes it (a data race, seen as garbled replies under
// -race), and a line over 64 KiB ends the connection. This monitor has no
// reader goroutine: Run writes the command and reads lines, skipping
// events (this backend never subscribes to them), until the reply, which
// it returns as its own copy.
type sockMonitor struct {
	mu sync.Mutex // one command at a time: replies are in order
	c  net.Conn
	r  *bufio.Reader
}

var _ qmp.Monitor = (*sockMonitor)(nil)

// dialSocketMonitor connects to the QMP socket at path; Connect completes
// the handshake.
func dialSocketMonitor(path string, timeout time.Duration) (*sockMonitor, error) {
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, err
	}
	return &sockMonitor{c: c, r: bufio.NewReaderSize(c, 64<<10)}, nil
}

// Connect reads QEMU's greeting and leaves capabilities negotiation mode
// (qmp_capabilities), after which commands are accepted.
func (m *sockMonitor) Connect() error {
	m.mu.Lock()
	line, err := m.line()
	m.mu.Unlock()
	if err != nil {
		return fmt.Errorf("reading the QMP greeting: %w", err)
	}
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if json.Unmarshal(line, &greeting) != nil || len(greeting.QMP) == 0 {
		return fmt.Errorf("not a QMP greeting: %.80q", line)
	}
	_, err = m.Run([]byte(`{"execute":"qmp_capabilities"}`))
	return err
}

// Disconnect closes the connection; a Run blocked on it returns an error.
func (m *sockMonitor) Disconnect() error { return m.c.Close() }

// Run sends one command and returns its reply (a copy the caller owns).
// A reply with an error is returned as an error with QEMU's description,
// as go-qemu's monitors do.
func (m *sockMonitor) Run(command []byte) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, err := m.c.Write(append(bytes.TrimRight(command, "\n"), '\n')); err != nil {
		return nil, err
	}
	for {
		line, err := m.line()
		if err != nil {
			// Out of step with QEMU (a line cut short or too long): the
			// next reply read would not be this command's.
			_ = m.c.Close()
			return nil, err
		}
		var r struct {
			Event string `json:"event"`
			Error *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
		}
		if err := json.Unmarshal(line, &r); err != nil {
			_ = m.c.Close()
			return nil, fmt.Errorf("QMP sent a line that is not JSON: %.80q", line)
		}
		switch {
		case r.Event != "":
			continue // an event between a command and its reply
		case r.Error != nil:
			if r.Error.Desc == "" {
				return nil, fmt.Errorf("QMP error %s", r.Error.Class)
			}
			return nil, errors.New(r.Error.Desc)
		}
		return line, nil
	}
}

// Events is not supported: the backend reads QEMU's state by commands,
// never from its events, which Run skips.
func (m *sockMonitor) Events(context.Context) (<-chan qmp.Event, error) {
	return nil, errors.New("qemu: this QMP monitor does not deliver events")
}

// line reads the next line that is not empty (without its newline) into a
// new slice, at most maxQMPLine bytes. The caller holds mu.
func (m *sockMonitor) line() ([]byte, error) {
	var out []byte
	for {
		frag, err := m.r.ReadSlice('\n')
		if len(out)+len(frag) > maxQMPLine {
			return nil, fmt.Errorf("QMP sent a line over %d bytes", maxQMPLine)
		}
		out = append(out, frag...)
		switch {
		case err == nil:
			if out = bytes.TrimRight(out, "\r\n"); len(out) == 0 {
				continue // an empty line: none is sent, but none matters
			}
			return out, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		default:
			return nil, err
		}
	}
}

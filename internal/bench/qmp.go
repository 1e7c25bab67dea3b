package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

// qmpConn is the least QMP client that does the direct baseline's work: a
// greeting, capabilities negotiation, then one command at a time.
type qmpConn struct {
	c net.Conn
	r *bufio.Reader
}

// dialQMP connects to a QMP socket, retrying until QEMU listens on it or
// ctx ends, and negotiates capabilities.
func dialQMP(ctx context.Context, path string) (*qmpConn, error) {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			q := &qmpConn{c: c, r: bufio.NewReader(c)}
			if dl, ok := ctx.Deadline(); ok {
				_ = c.SetDeadline(dl)
			}
			if _, err := q.r.ReadBytes('\n'); err != nil { // greeting
				c.Close()
				return nil, fmt.Errorf("QMP %s: reading greeting: %w", path, err)
			}
			if _, err := q.exec("qmp_capabilities"); err != nil {
				c.Close()
				return nil, err
			}
			return q, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("QMP %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-time.After(time.Millisecond):
		}
	}
}

func (q *qmpConn) close() { _ = q.c.Close() }

// exec runs one command and returns its "return" value, skipping events.
func (q *qmpConn) exec(cmd string) (json.RawMessage, error) {
	if _, err := fmt.Fprintf(q.c, "{\"execute\":%q}\n", cmd); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("QMP %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("QMP %s: decoding %q: %w", cmd, line, err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return nil, fmt.Errorf("QMP %s: %s: %s", cmd, resp.Error.Class, resp.Error.Desc)
		case resp.Return != nil:
			return resp.Return, nil
		}
	}
}

// status is query-status's "status".
func (q *qmpConn) status() (string, error) {
	raw, err := q.exec("query-status")
	if err != nil {
		return "", err
	}
	var s struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", err
	}
	return s.Status, nil
}

// waitStatus polls query-status until it reports want.
func (q *qmpConn) waitStatus(ctx context.Context, want string) error {
	for {
		st, err := q.status()
		if err != nil {
			return err
		}
		if st == want {
			return nil
		}
		if ctx.Err() != nil {
			return errors.New("QEMU reports " + st + ", not " + want)
		}
	}
}

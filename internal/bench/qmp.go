package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// qmpConn is the direct baseline's QMP connection: go-qemu's socket
// monitor, the QMP client the QEMU backend uses, driven one command at a
// time with no more wrapping than closing it when its context ends.
type qmpConn struct {
	mon  *qmp.SocketMonitor
	stop func() bool // stops closing the monitor when the context ends
}

// dialQMP connects to a QMP socket, retrying until QEMU listens on it or
// ctx ends, and negotiates capabilities. The connection is closed when ctx
// ends, which fails a command still waiting for its reply.
func dialQMP(ctx context.Context, path string) (*qmpConn, error) {
	for {
		mon, err := qmp.NewSocketMonitor("unix", path, time.Second)
		if err == nil {
			return connectQMP(ctx, path, mon)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("QMP %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-time.After(time.Millisecond):
		}
	}
}

// connectQMP reads the greeting and negotiates capabilities, giving up
// when ctx ends (go-qemu's Connect has no deadline of its own; closing the
// monitor while it runs would race with it, so it is closed once done).
func connectQMP(ctx context.Context, path string, mon *qmp.SocketMonitor) (*qmpConn, error) {
	done := make(chan error, 1)
	go func() { done <- mon.Connect() }()
	select {
	case err := <-done:
		if err != nil {
			_ = mon.Disconnect()
			return nil, fmt.Errorf("QMP %s: capabilities: %w", path, err)
		}
	case <-ctx.Done():
		go func() {
			<-done
			_ = mon.Disconnect()
		}()
		return nil, fmt.Errorf("QMP %s: capabilities: %w", path, ctx.Err())
	}
	q := &qmpConn{mon: mon}
	q.stop = context.AfterFunc(ctx, func() { _ = mon.Disconnect() })
	return q, nil
}

func (q *qmpConn) close() {
	q.stop()
	_ = q.mon.Disconnect()
}

// exec runs one command and returns its "return" value (go-qemu hands
// events to its own channel, never as a reply).
func (q *qmpConn) exec(cmd string) (json.RawMessage, error) {
	req, err := json.Marshal(qmp.Command{Execute: cmd})
	if err != nil {
		return nil, err
	}
	b, err := q.mon.Run(req)
	if err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	var resp struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(b, &resp); err != nil {
		return nil, fmt.Errorf("QMP %s: decoding %q: %w", cmd, b, err)
	}
	return resp.Return, nil
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

package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// monitor is a QMP connection whose every step is bounded by a context.
// go-qemu's monitors have no deadlines of their own: a Connect or Run
// that outlives its context is abandoned and the connection closed. It
// speaks through go-qemu's qmp.Monitor interface: a sockMonitor to a real
// QEMU, a qmptest monitor in unit tests.
type monitor struct {
	mon qmp.Monitor
}

// dialQMP connects to a QMP socket and completes the qmp_capabilities
// handshake, retrying while the socket is not there yet, until ctx ends.
func dialQMP(ctx context.Context, path string) (*monitor, error) {
	var lastErr error
	for {
		timeout := 2 * time.Second
		if dl, ok := ctx.Deadline(); ok {
			if d := time.Until(dl); d < timeout {
				timeout = d
			}
		}
		if timeout <= 0 {
			if lastErr == nil {
				lastErr = ctx.Err()
			}
			return nil, fmt.Errorf("%w (last error: %v)", context.DeadlineExceeded, lastErr)
		}
		mon, err := dialSocketMonitor(path, timeout)
		if err == nil {
			return connect(ctx, mon)
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (last error: %v)", ctx.Err(), lastErr)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// connect completes the qmp_capabilities handshake on mon, bounded by ctx.
func connect(ctx context.Context, mon qmp.Monitor) (*monitor, error) {
	done := make(chan error, 1)
	go func() { done <- mon.Connect() }()
	select {
	case err := <-done:
		if err != nil {
			_ = mon.Disconnect()
			return nil, fmt.Errorf("QMP handshake: %w", err)
		}
		return &monitor{mon: mon}, nil
	case <-ctx.Done():
		// Closing the connection ends a Connect blocked on a QEMU that
		// accepted but never greets (stopped, hung).
		_ = mon.Disconnect()
		<-done
		return nil, fmt.Errorf("QMP handshake: %w", ctx.Err())
	}
}

// run executes one QMP command and decodes its "return" into out (if not nil).
func (m *monitor) run(ctx context.Context, cmd string, args any, out any) error {
	req, err := json.Marshal(qmp.Command{Execute: cmd, Args: args})
	if err != nil {
		return err
	}
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		b, err := m.mon.Run(req)
		done <- result{b, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-ctx.Done():
		_ = m.mon.Disconnect() // unblocks Run
		<-done
		return fmt.Errorf("QMP %s: %w", cmd, ctx.Err())
	}
	if res.err != nil {
		return fmt.Errorf("QMP %s: %w", cmd, res.err)
	}
	if out == nil {
		return nil
	}
	var resp struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(res.b, &resp); err != nil {
		return fmt.Errorf("QMP %s: decoding reply: %w", cmd, err)
	}
	if err := json.Unmarshal(resp.Return, out); err != nil {
		return fmt.Errorf("QMP %s: decoding reply: %w", cmd, err)
	}
	return nil
}

func (m *monitor) close() { _ = m.mon.Disconnect() }

// qmpStatus is the reply of query-status.
type qmpStatus struct {
	Running bool   `json:"running"`
	Status  string `json:"status"`
}

func (m *monitor) status(ctx context.Context) (qmpStatus, error) {
	var s qmpStatus
	err := m.run(ctx, "query-status", nil, &s)
	return s, err
}

// vnc returns where the VNC server listens: unix:<path> for a unix
// socket (what vmherd asks for), host:port otherwise, "" if there is
// none.
func (m *monitor) vnc(ctx context.Context) (string, error) {
	var v struct {
		Enabled bool   `json:"enabled"`
		Family  string `json:"family"`
		Host    string `json:"host"`
		Service string `json:"service"`
	}
	if err := m.run(ctx, "query-vnc", nil, &v); err != nil {
		return "", err
	}
	if !v.Enabled || v.Service == "" {
		return "", nil
	}
	if v.Family == "unix" {
		return "unix:" + v.Service, nil
	}
	return v.Host + ":" + v.Service, nil
}

// withQMP connects to the socket, runs f and disconnects.
func withQMP(ctx context.Context, path string, f func(m *monitor) error) error {
	m, err := dialQMP(ctx, path)
	if err != nil {
		return fmt.Errorf("connecting QMP %s: %w", path, err)
	}
	defer m.close()
	return f(m)
}

package client

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"
)

// WaitCommand waits for a command sent earlier (by anyone: its id is
// enough) to end, as Wait does for one this client sent: it reads the
// VM's events from the first.
func (c *Client) WaitCommand(ctx context.Context, name, commandID string, opts ...WaitOption) (*Result, error) {
	if err := api.ValidateName(name); err != nil {
		return nil, err
	}
	if commandID == "" {
		return nil, errors.New("no command id")
	}
	return c.Wait(ctx, &Sent{VM: name, CommandID: commandID, From: 1}, opts...)
}

// ErrNeverState: the state waited for cannot come any more (the VM was
// destroyed, or has no record and the wait is not for destroyed).
var ErrNeverState = errors.New("it cannot happen any more")

// WaitState waits until the VM's record is in state with no command in
// flight, and returns it. Waiting for destroyed also ends when the VM has
// no record (never made, or purged). A VM destroyed while waiting for
// another state is an error (errors.Is ErrNeverState), as is one that does
// not exist.
func (c *Client) WaitState(ctx context.Context, name string, state api.VmState) (*api.VmRecord, error) {
	wait := 20 * time.Millisecond
	for {
		r, err := c.Record(ctx, name)
		switch {
		case errors.Is(err, ErrNotFound) && state == api.StateDestroyed:
			return nil, nil
		case errors.Is(err, ErrNotFound):
			return nil, fmt.Errorf("vm %s does not exist: %w", name, ErrNeverState)
		case err != nil && ctx.Err() != nil:
			return nil, &TimeoutError{VM: name, Err: ctx.Err()}
		case err != nil:
			return nil, err
		case r.State == state && len(r.InFlight) == 0:
			return r, nil
		case r.Destroyed():
			return r, fmt.Errorf("vm %s was destroyed: %w", name, ErrNeverState)
		}
		select {
		case <-ctx.Done():
			return r, &TimeoutError{VM: name, Err: ctx.Err()}
		case <-time.After(wait):
		}
		wait = min(2*wait, 500*time.Millisecond)
	}
}

// WaitSSH waits until an SSH server answers on the guest's port 22 (its
// version banner, through the tunnel), and returns the banner. It does
// not log in.
func (c *Client) WaitSSH(ctx context.Context, name string) (string, error) {
	return c.WaitBanner(ctx, name, 22, "SSH-")
}

// WaitBanner waits until a server on the guest's port greets a new
// connection with a line starting with prefix ("": any line), and
// returns that line. Until then it tries again every second: the VM may
// not run yet, its guest may be booting. It gives up at once (ErrNeverState)
// when the VM is destroyed, does not exist or has no network.
func (c *Client) WaitBanner(ctx context.Context, name string, port int, prefix string) (string, error) {
	var last error
	for {
		line, err := c.banner(ctx, name, port)
		if err == nil && strings.HasPrefix(line, prefix) {
			return line, nil
		}
		if err == nil {
			err = fmt.Errorf("port %d said %q", port, line)
		}
		last = err
		switch r, rerr := c.Record(ctx, name); {
		case rerr == nil && r.Destroyed():
			return "", fmt.Errorf("vm %s was destroyed: %w", name, ErrNeverState)
		case rerr == nil && r.Handle != nil && r.Handle.Spec != nil && r.Handle.Spec.Network != nil && r.Handle.Spec.Network.Type == api.NetworkNone:
			return "", fmt.Errorf("vm %s has no network (network none): nothing can reach its port %d: %w", name, port, ErrNeverState)
		case errors.Is(rerr, ErrNotFound):
			return "", fmt.Errorf("vm %s does not exist: %w", name, ErrNeverState)
		}
		select {
		case <-ctx.Done():
			return "", &TimeoutError{VM: name, Err: fmt.Errorf("%w (last try: %v)", ctx.Err(), last)}
		case <-time.After(time.Second):
		}
	}
}

func (c *Client) banner(ctx context.Context, name string, port int) (string, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := c.DialGuest(dctx, name, port)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil && line == "" {
		return "", err
	}
	return strings.TrimRight(line, "\r\n"), nil
}

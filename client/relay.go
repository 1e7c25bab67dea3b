package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"

	"github.com/vmherd/vmherd/internal/relay"
)

// ErrConsoleClosed ends a console's Read when its VM's console went away
// (the VM stopped, or the worker closed it); the *ConsoleClosedError
// says why.
var ErrConsoleClosed = errors.New("console closed")

// ConsoleClosedError is why a console ended.
type ConsoleClosedError struct{ Reason string }

func (e *ConsoleClosedError) Error() string        { return "console closed: " + e.Reason }
func (e *ConsoleClosedError) Is(target error) bool { return target == ErrConsoleClosed }

// Console attaches to a running VM's serial console through the worker of
// its host, from any machine on the bus. Reads give the recent output
// first, then what the guest writes; writes type into the console. Close
// detaches (the VM runs on).
func (c *Client) Console(ctx context.Context, name string) (io.ReadWriteCloser, error) {
	host, err := c.placed(ctx, name)
	if err != nil {
		return nil, err
	}
	con, err := relay.AttachConsole(ctx, c.nc, c.names, host, name)
	if err != nil {
		return nil, relayErr(host, err)
	}
	return &console{con}, nil
}

type console struct{ *relay.Console }

func (c *console) Read(p []byte) (int, error) {
	n, err := c.Console.Read(p)
	var closed *relay.ClosedError
	if errors.As(err, &closed) {
		err = &ConsoleClosedError{Reason: closed.Reason}
	}
	return n, err
}

// Log writes a VM's console log to w through the worker of its host: the
// last tail lines (-1: all), then, with follow, what the guest writes
// until ctx ends. While following it rides out a worker or connection that
// is away for a while, and calls trouble (if not nil) with the error when
// reads start failing and with nil when they work again.
func (c *Client) Log(ctx context.Context, name string, w io.Writer, tail int, follow bool, trouble func(error)) error {
	host, err := c.placed(ctx, name)
	if err != nil {
		return err
	}
	return relayErr(host, relay.FollowLog(ctx, c.nc, c.names, host, name, w, tail, follow, trouble))
}

// Tunnel is DialGuest for a stream the caller has (a local TCP
// connection, stdin and stdout): it carries rw to and from port on the
// guest until either side ends, and closes rw.
func (c *Client) Tunnel(ctx context.Context, name string, port int, rw io.ReadWriteCloser) error {
	host, err := c.placed(ctx, name)
	if err != nil {
		_ = rw.Close()
		return err
	}
	t, err := relay.OpenTunnel(ctx, c.nc, c.names, host, name, port)
	if err != nil {
		_ = rw.Close()
		return relayErr(host, err)
	}
	return relayErr(host, t.Splice(ctx, rw))
}

// DialGuest opens a TCP connection to port on a running VM's guest,
// tunnelled through NATS and the worker of the VM's host: it reaches the
// guest from any machine on the bus, whatever its network. The
// connection ends when either side closes it or ctx ends.
func (c *Client) DialGuest(ctx context.Context, name string, port int) (net.Conn, error) {
	if port < 1 || port > 65535 {
		return nil, fmt.Errorf("port %d is not a TCP port", port)
	}
	host, err := c.placed(ctx, name)
	if err != nil {
		return nil, err
	}
	t, err := relay.OpenTunnel(ctx, c.nc, c.names, host, name, port)
	if err != nil {
		return nil, relayErr(host, err)
	}
	ours, theirs := net.Pipe()
	// ctx bounds the dial only, as with net.Dialer: closing the conn ends it.
	go func() { _ = t.Splice(context.WithoutCancel(ctx), theirs) }()
	return &guestConn{Conn: ours, addr: guestAddr(name + ":" + strconv.Itoa(port))}, nil
}

type guestConn struct {
	net.Conn
	addr net.Addr
}

func (g *guestConn) RemoteAddr() net.Addr { return g.addr }

type guestAddr string

func (a guestAddr) Network() string { return "vmherd-tunnel" }
func (a guestAddr) String() string  { return string(a) }

// placed is the host of a VM that has one.
func (c *Client) placed(ctx context.Context, name string) (string, error) {
	r, err := c.Record(ctx, name)
	if err != nil {
		return "", err
	}
	if r.Host == "" {
		return "", &WorkerError{Code: "409", Message: fmt.Sprintf("vm %s is not placed on a host yet", name)}
	}
	return r.Host, nil
}

func relayErr(host string, err error) error {
	if err == nil {
		return nil
	}
	var re *relay.ReplyError
	if errors.As(err, &re) {
		return &WorkerError{Host: host, Code: re.Code, Message: re.Message}
	}
	if errors.Is(err, relay.ErrNoResponders) {
		return &WorkerError{Host: host, Err: err}
	}
	return notAllowed(err)
}

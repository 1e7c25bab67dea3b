package bench

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/vmherd/vmherd/internal/relay"
)

// Console is figure 6: the relay (console and tunnel) against the direct
// unix socket and direct TCP.
type Console struct {
	Bytes int64 `json:"bytes"`
	// Console output throughput, MiB/s: read straight from the unix
	// socket, and through the hub and NATS by one viewer.
	DirectMiBs float64 `json:"direct_mib_per_s"`
	RelayMiBs  float64 `json:"relay_mib_per_s"`
	Ratio      float64 `json:"ratio"`
	// RelayLost: bytes the viewer missed (its client fell behind).
	RelayLost uint64 `json:"relay_lost_bytes"`
	// Keystroke round trip: one byte typed, echoed by the console.
	DirectRTT Dist    `json:"direct_rtt"`
	RelayRTT  Dist    `json:"relay_rtt"`
	RTTRatio  float64 `json:"rtt_ratio_p50"`
	// Tunnel (port-forward) throughput, MiB/s, against direct TCP.
	TCPMiBs     float64 `json:"tcp_mib_per_s"`
	TunnelMiBs  float64 `json:"tunnel_mib_per_s"`
	TunnelRatio float64 `json:"tunnel_ratio"`
}

// fakeConsole serves a unix socket as QEMU's serial chardev would, with
// a console that either streams size bytes at once ("blast") or echoes
// each byte it gets ("echo").
func fakeConsole(dir string, size int64, blast bool) (net.Listener, error) {
	ln, err := net.Listen("unix", filepath.Join(dir, fmt.Sprintf("con-%v.sock", blast)))
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if !blast {
					_, _ = io.Copy(c, c)
					return
				}
				// Wait for the go signal (one byte), then stream.
				one := make([]byte, 1)
				if _, err := c.Read(one); err != nil {
					return
				}
				buf := make([]byte, 32<<10)
				_, _ = rand.Read(buf)
				for sent := int64(0); sent < size; sent += int64(len(buf)) {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	return ln, nil
}

type benchTarget struct {
	ep   api.ConsoleEndpoint
	addr string
}

func (t *benchTarget) ConsoleEndpoint(context.Context, string) (api.ConsoleEndpoint, error) {
	return t.ep, nil
}
func (t *benchTarget) GuestAddr(context.Context, string, int) (string, error) { return t.addr, nil }

func mibs(n int64, d time.Duration) float64 { return float64(n) / (1 << 20) / d.Seconds() }

// consoleBench runs figure 6 on one server.
func consoleBench(ctx context.Context, url, dir string, size int64, rtts int) (Console, error) {
	r := Console{Bytes: size}
	nc, err := nats.Connect(url, nats.Name("bench-relay-worker"))
	if err != nil {
		return r, err
	}
	defer nc.Close()
	vnc, err := nats.Connect(url, nats.Name("bench-relay-viewer"))
	if err != nil {
		return r, err
	}
	defer vnc.Close()
	names := api.DefaultNames
	start := func(tg *benchTarget) (*relay.Server, func(), error) {
		svc, err := micro.AddService(nc, micro.Config{Name: "bench-relay", Version: "0.0.1"})
		if err != nil {
			return nil, nil, err
		}
		s := &relay.Server{NC: nc, Names: names, Host: "h1", Log: slog.New(slog.DiscardHandler), Target: tg}
		if err := s.AddEndpoints(svc); err != nil {
			return nil, nil, err
		}
		if err := nc.Flush(); err != nil {
			return nil, nil, err
		}
		return s, func() { s.Close(); _ = svc.Stop() }, nil
	}

	// Throughput: direct.
	blast, err := fakeConsole(dir, size, true)
	if err != nil {
		return r, err
	}
	defer blast.Close()
	d, err := net.Dial("unix", blast.Addr().String())
	if err != nil {
		return r, err
	}
	t0 := time.Now()
	_, _ = d.Write([]byte{1})
	if _, err := io.CopyN(io.Discard, d, size); err != nil {
		return r, fmt.Errorf("direct console read: %w", err)
	}
	r.DirectMiBs = mibs(size, time.Since(t0))
	d.Close()

	// Throughput: through the relay.
	_, stop, err := start(&benchTarget{ep: api.ConsoleEndpoint{Kind: api.ConsoleUnixSocket, Path: blast.Addr().String()}})
	if err != nil {
		return r, err
	}
	c, err := relay.AttachConsole(ctx, vnc, names, "h1", "b1")
	if err != nil {
		stop()
		return r, err
	}
	t0 = time.Now()
	_, _ = c.Write([]byte{1})
	var got int64
	buf := make([]byte, 64<<10)
	for got+int64(c.Lost) < size {
		n, err := c.Read(buf)
		got += int64(n)
		if err != nil {
			stop()
			return r, fmt.Errorf("relay console read: %w", err)
		}
		if ctx.Err() != nil {
			stop()
			return r, ctx.Err()
		}
	}
	el := time.Since(t0)
	r.RelayMiBs, r.RelayLost = mibs(size-int64(c.Lost), el), c.Lost
	r.Ratio = ratio(r.RelayMiBs, r.DirectMiBs)
	_ = c.Close()
	stop()

	// Keystroke round trip.
	echo, err := fakeConsole(dir, 0, false)
	if err != nil {
		return r, err
	}
	defer echo.Close()
	rtt := func(rw io.ReadWriter) ([]time.Duration, error) {
		var ds []time.Duration
		one := make([]byte, 1)
		for i := range rtts + 10 {
			t := time.Now()
			if _, err := rw.Write([]byte{'a' + byte(i%26)}); err != nil {
				return nil, err
			}
			if _, err := io.ReadFull(rw, one); err != nil {
				return nil, err
			}
			if i >= 10 {
				ds = append(ds, time.Since(t))
			}
			time.Sleep(time.Millisecond)
		}
		return ds, nil
	}
	d, err = net.Dial("unix", echo.Addr().String())
	if err != nil {
		return r, err
	}
	ds, err := rtt(d)
	d.Close()
	if err != nil {
		return r, err
	}
	r.DirectRTT = dist(ds)
	_, stop, err = start(&benchTarget{ep: api.ConsoleEndpoint{Kind: api.ConsoleUnixSocket, Path: echo.Addr().String()}})
	if err != nil {
		return r, err
	}
	c, err = relay.AttachConsole(ctx, vnc, names, "h1", "b2")
	if err == nil {
		ds, err = rtt(c)
		_ = c.Close()
	}
	stop()
	if err != nil {
		return r, fmt.Errorf("relay keystrokes: %w", err)
	}
	r.RelayRTT = dist(ds)
	r.RTTRatio = ratio(r.RelayRTT.P50, r.DirectRTT.P50)

	// Tunnel against direct TCP: a sink that counts size bytes, then
	// answers one byte.
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return r, err
	}
	defer sink.Close()
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.CopyN(io.Discard, c, size)
				_, _ = c.Write([]byte{1})
			}()
		}
	}()
	send := func(w io.Writer, ack io.Reader) (time.Duration, error) {
		buf := make([]byte, 32<<10)
		t := time.Now()
		for sent := int64(0); sent < size; sent += int64(len(buf)) {
			if _, err := w.Write(buf); err != nil {
				return 0, err
			}
		}
		one := make([]byte, 1)
		_, err := io.ReadFull(ack, one)
		return time.Since(t), err
	}
	tc, err := net.Dial("tcp", sink.Addr().String())
	if err != nil {
		return r, err
	}
	el, err = send(tc, tc)
	tc.Close()
	if err != nil {
		return r, err
	}
	r.TCPMiBs = mibs(size, el)
	_, stop, err = start(&benchTarget{addr: sink.Addr().String()})
	if err != nil {
		return r, err
	}
	defer stop()
	near, far := net.Pipe()
	tunErr := make(chan error, 1)
	go func() { tunErr <- relay.DialTunnel(ctx, vnc, names, "h1", "b3", 22, far) }()
	el, err = send(near, near)
	near.Close()
	if terr := <-tunErr; err == nil && terr != nil && !errors.Is(terr, io.ErrClosedPipe) {
		err = terr
	}
	if err != nil {
		return r, fmt.Errorf("tunnel: %w", err)
	}
	r.TunnelMiBs = mibs(size, el)
	r.TunnelRatio = ratio(r.TunnelMiBs, r.TCPMiBs)
	return r, nil
}

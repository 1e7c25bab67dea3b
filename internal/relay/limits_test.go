package relay_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/vmherd/vmherd/internal/relay"
	"github.com/vmherd/vmherd/internal/testenv"
)

// What an attacker (or a broken client) does to the worker's far end of
// tunnels and consoles, one test per way it pinned memory or time in
// issue #26 (item 1), each against a real NATS server.

// stallGuest is a guest port that accepts and never reads (a suspended
// VM, a stuck server), with a small receive buffer so it fills quickly.
func stallGuest(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var held []net.Conn
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			_ = c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.(*net.TCPConn).SetReadBuffer(4096)
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	return ln.Addr().String()
}

// serveLimits runs the far end for h1 with limits.
func serveLimits(t *testing.T, env *testenv.Env, tg relay.Target, l relay.Limits) *relay.Server {
	t.Helper()
	nc, _ := env.Connect()
	svc, err := micro.AddService(nc, micro.Config{Name: "relay-test", Version: "0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	s := &relay.Server{NC: nc, Names: env.Names, Host: "h1", Log: env.Log, Target: tg, Limits: l}
	if err := s.AddEndpoints(svc); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		_ = svc.Stop()
	})
	return s
}

// rawTunnel speaks the tunnel protocol by hand, as a hostile client can.
type rawTunnel struct {
	nc   *nats.Conn
	up   string
	key  string
	down chan *nats.Msg
}

func openRaw(nc *nats.Conn, names api.Names, vmName string, port int) (*rawTunnel, error) {
	id := relay.NewTunnelID()
	r := &rawTunnel{nc: nc, up: names.Tunnel("h1", vmName, id, api.TunnelUp), down: make(chan *nats.Msg, 4096)}
	if _, err := nc.ChanSubscribe(names.Tunnel("h1", vmName, id, api.TunnelDown), r.down); err != nil {
		return nil, err
	}
	req := nats.NewMsg(names.Tunnel("h1", vmName, id, api.TunnelOpen))
	req.Header.Set(relay.HdrPort, strconv.Itoa(port))
	rep, err := nc.RequestMsg(req, 20*time.Second)
	if err != nil {
		return nil, err
	}
	if code := rep.Header.Get("Nats-Service-Error-Code"); code != "" {
		return nil, &relay.ReplyError{Code: code, Message: rep.Header.Get("Nats-Service-Error")}
	}
	r.key = rep.Header.Get("Vmherd-Key")
	return r, nil
}

// frame sends data frame seq without waiting for any acknowledgement.
func (r *rawTunnel) frame(seq int, data []byte) error {
	m := nats.NewMsg(r.up)
	m.Header.Set(relay.HdrSeq, strconv.Itoa(seq))
	m.Header.Set("Vmherd-Key", r.key)
	m.Data = data
	return r.nc.PublishMsg(m)
}

// closed waits for the worker to close the tunnel and returns why.
func (r *rawTunnel) closed(within time.Duration) (string, bool) {
	deadline := time.After(within)
	for {
		select {
		case m := <-r.down:
			if why := m.Header.Get(relay.HdrClosed); why != "" {
				return why, true
			}
		case <-deadline:
			return "", false
		}
	}
}

// heapMiB is the live heap after a collection.
func heapMiB() float64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return float64(ms.HeapAlloc) / (1 << 20)
}

// 40 frames of 8 MB (or 300 of 1 MiB, the server's payload limit
// allowing) sent at once to a guest that does not read: the
// worker held them all (a ChanSubscribe's buffer of 528 messages, whose
// SetPendingLimits call failed), 320 MB for one tunnel, until the guest
// read again. Now its client drops what is past the window and the
// tunnel ends; the heap stays within a few windows.
func TestTunnelFloodHeldToTheWindow(t *testing.T) {
	env := testenv.New(t)
	addr := stallGuest(t)
	serveLimits(t, env, &target{addr: func(int) (string, error) { return addr, nil }}, relay.Limits{})
	nc, _ := env.Connect()
	before := heapMiB()
	r, err := openRaw(nc, env.Names, "web1", 22)
	if err != nil {
		t.Fatal(err)
	}
	// 8 MB frames, or as big as the server takes (with room for
	// headers), 320 MB in all.
	big := bytes.Repeat([]byte("x"), min(8_000_000, int(nc.MaxPayload())-4096))
	n := 320_000_000 / len(big)
	for seq := range n {
		if err := r.frame(seq, big); err != nil {
			t.Fatal(err)
		}
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	why, ok := r.closed(20 * time.Second)
	time.Sleep(time.Second)
	held := heapMiB() - before
	t.Logf("heap %.0f MiB more after %d frames of %d bytes to a stalled guest; tunnel closed: %v %q", held, n, len(big), ok, why)
	if !ok {
		t.Errorf("the worker did not end a tunnel whose client sent 320 MB past its window")
	}
	if held > 48 {
		t.Errorf("the process holds %.0f MiB more after the flood (bound 48 MiB: the window is 1 MiB)", held)
	}
}

// Frames within the NATS client's buffer but against the protocol end
// the tunnel at once, with the reason: one larger than a chunk, or more
// unacknowledged data than the window.
func TestTunnelFramesChecked(t *testing.T) {
	env := testenv.New(t)
	addr := stallGuest(t)
	serveLimits(t, env, &target{addr: func(int) (string, error) { return addr, nil }}, relay.Limits{})
	nc, _ := env.Connect()
	for _, c := range []struct {
		name   string
		frames func(r *rawTunnel) error
		want   string
	}{
		{"a 64 KiB frame", func(r *rawTunnel) error { return r.frame(0, make([]byte, 64<<10)) }, "more than 32768"},
		// More than the guest's socket buffers take, so the worker's
		// writes block and it stops acknowledging.
		{"32 MiB unacknowledged", func(r *rawTunnel) error {
			for seq := range 1024 {
				if err := r.frame(seq, make([]byte, 32<<10)); err != nil {
					return err
				}
			}
			return nil
		}, "window"},
	} {
		r, err := openRaw(nc, env.Names, "web1", 22)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.frames(r); err != nil {
			t.Fatal(err)
		}
		why, ok := r.closed(10 * time.Second)
		if !ok || !strings.Contains(why, c.want) {
			t.Errorf("%s: the tunnel closed %v with %q, want a reason with %q", c.name, ok, why, c.want)
		}
	}
}

// endless is a reader that never ends.
type endless struct{}

func (endless) Read(p []byte) (int, error) { return len(p), nil }

// nearEnd is the client's side of a tunnel: endless data to send, output
// thrown away.
type nearEnd struct {
	io.Reader
	closed chan struct{}
	once   sync.Once
}

func newNearEnd(r io.Reader) *nearEnd          { return &nearEnd{Reader: r, closed: make(chan struct{})} }
func (n *nearEnd) Write(p []byte) (int, error) { return len(p), nil }
func (n *nearEnd) Close() error                { n.once.Do(func() { close(n.closed) }); return nil }
func (n *nearEnd) Read(p []byte) (int, error) {
	select {
	case <-n.closed:
		return 0, io.EOF
	default:
	}
	if n.Reader == nil { // idle until closed, as a connection
		<-n.closed
		return 0, io.EOF
	}
	return n.Reader.Read(p)
}

// A client that keeps to the window, to a guest that reads nothing: the
// worker's write to the guest waited for ever (pings kept the tunnel
// alive), holding a window and a connection. Now a write waits at most
// Limits.WriteTimeout and the tunnel ends, saying why.
func TestTunnelStalledGuestTimesOut(t *testing.T) {
	env := testenv.New(t)
	addr := stallGuest(t)
	serveLimits(t, env, &target{addr: func(int) (string, error) { return addr, nil }}, relay.Limits{WriteTimeout: 2 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	t0 := time.Now()
	err := relay.DialTunnel(ctx, env.NC, env.Names, "h1", "web1", 22, newNearEnd(endless{}))
	t.Logf("the tunnel to a guest that reads nothing ended after %v: %v", time.Since(t0).Round(100*time.Millisecond), err)
	if err == nil || !strings.Contains(err.Error(), "read nothing") {
		t.Fatalf("tunnel to a stalled guest: %v, want it ended because the guest read nothing", err)
	}
}

// The worker stops (SIGTERM) while a tunnel is stuck on a guest that
// reads nothing: Close waited for the tunnel for ever (the drain ran out
// and the worker exited 1). Now the tunnels end at once and their clients
// are told the worker is stopping.
func TestCloseEndsStuckTunnels(t *testing.T) {
	env := testenv.New(t)
	addr := stallGuest(t)
	s := serveLimits(t, env, &target{addr: func(int) (string, error) { return addr, nil }}, relay.Limits{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tunErr := make(chan error, 1)
	go func() { tunErr <- relay.DialTunnel(ctx, env.NC, env.Names, "h1", "web1", 22, newNearEnd(endless{})) }()
	time.Sleep(3 * time.Second) // the guest's buffers fill; the worker's write blocks
	closed := make(chan struct{})
	t0 := time.Now()
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
		t.Logf("Close returned after %v", time.Since(t0).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return within 10s with a tunnel stuck on a guest that reads nothing")
	}
	select {
	case err := <-tunErr:
		if err == nil || !strings.Contains(err.Error(), "stopping") {
			t.Errorf("the client was told %v, want that the worker is stopping", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("the client was not told the tunnel closed")
	}
}

// slowTarget is a host whose VM "slow" takes its time to say where its
// guest is (a busy backend), and "web1" answers at once.
type slowTarget struct {
	addr              string
	inSlow, maxInSlow atomic.Int32
}

func (s *slowTarget) ConsoleEndpoint(context.Context, string) (api.ConsoleEndpoint, error) {
	return api.ConsoleEndpoint{}, &relay.StatusError{Code: "409", Err: errors.New("no console")}
}

func (s *slowTarget) GuestAddr(ctx context.Context, name string, _ int) (string, error) {
	if name == "slow" {
		n := s.inSlow.Add(1)
		defer s.inSlow.Add(-1)
		for {
			m := s.maxInSlow.Load()
			if n <= m || s.maxInSlow.CompareAndSwap(m, n) {
				break
			}
		}
		select {
		case <-time.After(3 * time.Second):
		case <-ctx.Done():
		}
		return "", &relay.StatusError{Code: "409", Err: errors.New("slow has no guest")}
	}
	return s.addr, nil
}

// One identity's many opens: they went through one serial handler, so
// 300 opens made another identity's open wait 9-14 s. Now each open is
// answered in a goroutine of its own, at most TunnelsPerRequester at once
// per identity (the rest refused at once), and another identity's open
// is answered meanwhile.
func TestTunnelOpensConcurrent(t *testing.T) {
	env := testenv.New(t)
	g := &slowTarget{addr: stallGuest(t)}
	serveLimits(t, env, g, relay.Limits{TunnelsPerRequester: 8})
	alice, _ := env.Connect()
	bob, _ := env.Connect()
	var refused, failed atomic.Int32
	var wg sync.WaitGroup
	for range 60 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := openRaw(alice, env.Names, "slow", 22)
			var re *relay.ReplyError
			switch {
			case errors.As(err, &re) && re.Code == "429":
				refused.Add(1)
			case err != nil:
				failed.Add(1)
			}
		}()
	}
	time.Sleep(500 * time.Millisecond) // alice's opens are in
	t0 := time.Now()
	r, err := openRaw(bob, env.Names, "web1", 22)
	took := time.Since(t0)
	wg.Wait()
	t.Logf("bob's open took %v while alice had 60 opens going (%d refused at once, %d failed after the wait, at most %d at a time)",
		took.Round(time.Millisecond), refused.Load(), failed.Load(), g.maxInSlow.Load())
	if err != nil {
		t.Fatalf("bob's open: %v", err)
	}
	_ = r
	if took > 2*time.Second {
		t.Errorf("bob's open took %v behind alice's (want < 2s; alone it takes milliseconds)", took)
	}
	if m := g.maxInSlow.Load(); m > 8 {
		t.Errorf("%d of alice's opens were handled at once, more than her limit 8", m)
	}
	if refused.Load() < 40 {
		t.Errorf("only %d of alice's 60 opens were refused, with at most 8 at a time", refused.Load())
	}
}

// Tunnels kept alive by pings were uncapped (120 tunnels: 121 more fds,
// 250 more goroutines). Now one identity has at most
// TunnelsPerRequester and the host at most Tunnels; a refusal says which
// limit and how to change it, and a closed tunnel makes room.
func TestTunnelLimits(t *testing.T) {
	env := testenv.New(t)
	addr := stallGuest(t)
	s := serveLimits(t, env, &target{addr: func(int) (string, error) { return addr, nil }}, relay.Limits{Tunnels: 6, TunnelsPerRequester: 4})
	alice, _ := env.Connect()
	bob, _ := env.Connect()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// open keeps a tunnel open (its near end idle) until stop.
	open := func(nc *nats.Conn) (stop func(), err error) {
		near := newNearEnd(nil)
		tctx, tcancel := context.WithCancel(ctx)
		errc := make(chan error, 1)
		go func() { errc <- relay.DialTunnel(tctx, nc, env.Names, "h1", "web1", 22, near) }()
		select {
		case err := <-errc:
			tcancel()
			return nil, err
		case <-time.After(2 * time.Second): // open, and running
			return func() { tcancel(); <-errc }, nil
		}
	}
	var stops []func()
	defer func() {
		for _, s := range stops {
			s()
		}
	}()
	for i := range 4 {
		stop, err := open(alice)
		if err != nil {
			t.Fatalf("alice's tunnel %d: %v", i+1, err)
		}
		stops = append(stops, stop)
	}
	if _, err := open(alice); err == nil || !strings.Contains(err.Error(), "--tunnels-per-identity") {
		t.Fatalf("alice's fifth tunnel: %v, want refused by the per-identity limit", err)
	}
	for i := range 2 {
		stop, err := open(bob)
		if err != nil {
			t.Fatalf("bob's tunnel %d: %v", i+1, err)
		}
		stops = append(stops, stop)
	}
	if _, err := open(bob); err == nil || !strings.Contains(err.Error(), "--tunnels)") {
		t.Fatalf("bob's third tunnel: %v, want refused by the host's limit", err)
	}
	if n := s.Tunnels(); n != 6 {
		t.Errorf("the server counts %d tunnels, want 6", n)
	}
	stops[0]()
	stops = stops[1:]
	waitFor(t, "alice's closed tunnel to be counted out", func() bool { return s.Tunnels() == 5 })
	stop, err := open(bob)
	if err != nil {
		t.Fatalf("bob's tunnel after one closed: %v", err)
	}
	stops = append(stops, stop)
}

// slowConsole is a serial console on a unix socket that reads input
// slowly (512 bytes every 10 ms) and answers each line that ends in a
// word with "echo: <word>" (the last 64 bytes of a line are kept).
func slowConsole(t *testing.T) string {
	t.Helper()
	path := t.TempDir() + "/serial.sock"
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = c.Write([]byte("guest login: "))
		buf := make([]byte, 512)
		var line []byte
		for {
			n, err := c.Read(buf)
			for _, b := range buf[:n] {
				if b == '\n' {
					if w := strings.TrimSpace(string(line)); w != "" && !strings.ContainsRune(w, 'x') {
						_, _ = fmt.Fprintf(c, "echo: %s\r\n", w)
					}
					line = line[:0]
					continue
				}
				if len(line) == 64 {
					line = line[1:]
				}
				line = append(line, b)
			}
			if err != nil {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	return path
}

// A 48 MB burst typed into a console left another viewer's keystrokes
// unechoed for over 45 s: input waited in one queue, as long as the
// NATS client's default buffer (64 MB). Now each typist has a bounded
// queue of its own and they take turns: bob is echoed within seconds of
// alice's burst, and what did not fit of hers is dropped.
func TestConsoleInputFair(t *testing.T) {
	env := testenv.New(t)
	sock := slowConsole(t)
	serveLimits(t, env, &target{ep: api.ConsoleEndpoint{Kind: api.ConsoleUnixSocket, Path: sock}}, relay.Limits{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	anc, _ := env.Connect()
	bnc, _ := env.Connect()
	alice, err := relay.AttachConsole(ctx, anc, env.Names, "h1", "web1")
	if err != nil {
		t.Fatal(err)
	}
	defer alice.Close()
	bob, err := relay.AttachConsole(ctx, bnc, env.Names, "h1", "web1")
	if err != nil {
		t.Fatal(err)
	}
	defer bob.Close()
	readUntil(t, bob, "guest login: ")
	burst := bytes.Repeat([]byte("x"), 1<<20)
	for range 48 {
		if _, err := alice.Write(burst); err != nil {
			t.Fatal(err)
		}
	}
	if err := anc.Flush(); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if _, err := bob.Write([]byte("\nbob-was-here\n")); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		var out bytes.Buffer
		buf := make([]byte, 4096)
		for {
			n, err := bob.Read(buf)
			out.Write(buf[:n])
			if strings.Contains(out.String(), "echo: bob-was-here") {
				got <- nil
				return
			}
			if err != nil {
				got <- err
				return
			}
		}
	}()
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("bob was echoed %v after alice typed 48 MB", time.Since(t0).Round(time.Millisecond))
		if took := time.Since(t0); took > 5*time.Second {
			t.Errorf("bob's keystrokes were echoed only after %v (want < 5s)", took)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("bob's keystrokes were not echoed within 20s of alice's 48 MB burst")
	}
}

package relay_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
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
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
)

// target is a host with one VM, "web1", whose console, log and guest
// ports are what the test sets up.
type target struct {
	ep   api.ConsoleEndpoint
	addr func(port int) (string, error)
}

func (t *target) ConsoleEndpoint(_ context.Context, name string) (api.ConsoleEndpoint, error) {
	if name != "web1" {
		return api.ConsoleEndpoint{}, &relay.StatusError{Code: "404", Err: fmt.Errorf("no VM %s on this host", name)}
	}
	return t.ep, nil
}

func (t *target) GuestAddr(_ context.Context, name string, port int) (string, error) {
	if name != "web1" || t.addr == nil {
		return "", &relay.StatusError{Code: "404", Err: fmt.Errorf("no VM %s on this host", name)}
	}
	return t.addr(port)
}

// serve runs the far end for host h1 on its own connection.
func serve(t *testing.T, env *testenv.Env, tg *target) *relay.Server {
	s, _ := serveConn(t, env, tg)
	return s
}

func serveConn(t *testing.T, env *testenv.Env, tg *target) (*relay.Server, *nats.Conn) {
	t.Helper()
	nc, _ := env.Connect()
	svc, err := micro.AddService(nc, micro.Config{Name: "relay-test", Version: "0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	s := &relay.Server{NC: nc, Names: env.Names, Host: "h1", Log: env.Log, Target: tg}
	if err := s.AddEndpoints(svc); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil { // the endpoints are subscribed at the server
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		_ = svc.Stop()
	})
	return s, nc
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// log --tail N -f over NATS prints the last lines, then what is appended,
// until interrupted; a truncated log is read again from its start.
func TestLogTailFollow(t *testing.T) {
	env := testenv.New(t)
	p := filepath.Join(t.TempDir(), "console.log")
	if err := os.WriteFile(p, []byte("one\ntwo\nthree\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	serve(t, env, &target{ep: api.ConsoleEndpoint{Kind: api.ConsoleUnixSocket, LogPath: p}})
	ctx, cancel := context.WithCancel(context.Background())
	var out syncbuf.Buffer
	done := make(chan error, 1)
	go func() { done <- relay.PrintLog(ctx, env.NC, env.Names, "h1", "web1", &out, 2, true) }()
	waitOut := func(want string) {
		t.Helper()
		waitFor(t, fmt.Sprintf("output %q (have %q)", want, out.String()), func() bool { return out.String() == want })
	}
	waitOut("two\nthree\n")
	f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString("four\n")
	f.Close()
	waitOut("two\nthree\nfour\n")
	if err := os.WriteFile(p, []byte("rebooted\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitOut("two\nthree\nfour\nrebooted\n")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var all bytes.Buffer
	if err := relay.PrintLog(context.Background(), env.NC, env.Names, "h1", "web1", &all, -1, false); err != nil || all.String() != "rebooted\n" {
		t.Fatalf("log without -f: %q, %v", all.String(), err)
	}
	// A big log comes in pieces, all of it.
	big := bytes.Repeat([]byte("0123456789abcdef\n"), 3*relay.LogChunk/17)
	if err := os.WriteFile(p, big, 0o644); err != nil {
		t.Fatal(err)
	}
	all.Reset()
	if err := relay.PrintLog(context.Background(), env.NC, env.Names, "h1", "web1", &all, -1, false); err != nil || !bytes.Equal(all.Bytes(), big) {
		t.Fatalf("a %d-byte log read back as %d bytes, %v", len(big), all.Len(), err)
	}
	// Another VM's log: the worker says it has no such VM.
	err = relay.PrintLog(context.Background(), env.NC, env.Names, "h1", "web2", &all, -1, false)
	var re *relay.ReplyError
	if !errors.As(err, &re) || re.Code != "404" {
		t.Fatalf("log of a VM not on the host: %v", err)
	}
}

// A console log rotated (copied to console.log.1, then truncated, as the
// QEMU backend does) while a viewer follows it: the follower reads the
// end of the old file before the new one, so nothing is skipped; a tail
// right after a rotation takes its first lines from console.log.1
// (issue #26.8).
func TestLogFollowAcrossRotation(t *testing.T) {
	env := testenv.New(t)
	p := filepath.Join(t.TempDir(), "console.log")
	if err := os.WriteFile(p, []byte("a\nb\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	serve(t, env, &target{ep: api.ConsoleEndpoint{Kind: api.ConsoleUnixSocket, LogPath: p}})
	ctx, cancel := context.WithCancel(context.Background())
	var out syncbuf.Buffer
	done := make(chan error, 1)
	go func() { done <- relay.PrintLog(ctx, env.NC, env.Names, "h1", "web1", &out, 10, true) }()
	waitOut := func(want string) {
		t.Helper()
		waitFor(t, fmt.Sprintf("output %q (have %q)", want, out.String()), func() bool { return out.String() == want })
	}
	waitOut("a\nb\n")
	// "c" is written and the file rotated at once, well inside one poll.
	if err := os.WriteFile(p+".1", []byte("a\nb\nc\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 0); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString("d\n")
	f.Close()
	waitOut("a\nb\nc\nd\n")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var tail bytes.Buffer
	if err := relay.PrintLog(context.Background(), env.NC, env.Names, "h1", "web1", &tail, 3, false); err != nil || tail.String() != "b\nc\nd\n" {
		t.Fatalf("log --tail 3 after a rotation: %q, %v", tail.String(), err)
	}
}

func TestLastLines(t *testing.T) {
	for _, c := range []struct {
		in   string
		n    int
		want string
	}{
		{"a\nb\nc\n", 2, "b\nc\n"},
		{"a\nb\nc", 2, "b\nc"},
		{"a\nb\nc\n", 5, "a\nb\nc\n"},
		{"a\nb\nc\n", 0, ""},
		{"a\nb\nc\n", -1, "a\nb\nc\n"},
		{"", 3, ""},
		{"only", 1, "only"},
	} {
		if got := string(relay.LastLines([]byte(c.in), c.n)); got != c.want {
			t.Errorf("LastLines(%q, %d) = %q, want %q", c.in, c.n, got, c.want)
		}
	}
}

// guest is a fake serial console on a unix socket (what QEMU serves): it
// prints a banner, echoes each line typed as "echo: <line>", and on
// "flood" writes lines as fast as the socket takes them until "stop".
type guest struct {
	ln      net.Listener
	written atomic.Int64 // bytes the guest wrote
	conn    chan net.Conn
}

func newGuest(t *testing.T) *guest {
	t.Helper()
	path := filepath.Join(t.TempDir(), "serial.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	g := &guest{ln: ln, conn: make(chan net.Conn, 1)}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		g.conn <- c
		g.run(c)
	}()
	return g
}

func (g *guest) write(c net.Conn, s string) error {
	n, err := c.Write([]byte(s))
	g.written.Add(int64(n))
	return err
}

func (g *guest) run(c net.Conn) {
	_ = g.write(c, "guest login: ")
	var flooding atomic.Bool
	lines := make(chan string, 16)
	go func() {
		defer close(lines)
		var line []byte
		buf := make([]byte, 256)
		for {
			n, err := c.Read(buf)
			for _, b := range buf[:n] {
				if b == '\n' {
					lines <- string(line)
					line = line[:0]
				} else {
					line = append(line, b)
				}
			}
			if err != nil {
				return
			}
		}
	}()
	tick := 0
	for {
		if flooding.Load() {
			select {
			case l, ok := <-lines:
				if !ok {
					return
				}
				if l == "stop" {
					flooding.Store(false)
				}
			default:
				tick++
				if g.write(c, fmt.Sprintf("tick %08d %s\r\n", tick, strings.Repeat("x", 100))) != nil {
					return
				}
			}
			continue
		}
		l, ok := <-lines
		if !ok {
			return
		}
		if l == "flood" {
			flooding.Store(true)
			continue
		}
		if g.write(c, "echo: "+l+"\r\n") != nil {
			return
		}
	}
}

// readUntil reads r until its output contains want.
func readUntil(t *testing.T, r io.Reader, want string) string {
	t.Helper()
	var got bytes.Buffer
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			got.Write(buf[:n])
			if strings.Contains(got.String(), want) {
				done <- nil
				return
			}
			if err != nil {
				done <- err
				return
			}
		}
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("reading until %q: %v (got %q)", want, err, got.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("no %q within 10s", want)
	}
	return got.String()
}

// Two viewers at once see the same console and both can type; a viewer
// attaching later gets the recent output replayed; a viewer that stops
// reading neither holds up the guest nor the other viewer, its buffer
// stays bounded, and when it reads again it is told what it lost; when
// the console closes, viewers get a ClosedError.
func TestConsoleRelay(t *testing.T) {
	env := testenv.New(t)
	g := newGuest(t)
	logPath := filepath.Join(t.TempDir(), "console.log")
	if err := os.WriteFile(logPath, []byte("[boot] before anyone attached\r\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	serve(t, env, &target{ep: api.ConsoleEndpoint{Kind: api.ConsoleUnixSocket, Path: g.ln.Addr().String(), LogPath: logPath}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nc1, _ := env.Connect()
	nc2, _ := env.Connect()
	a, err := relay.AttachConsole(ctx, nc1, env.Names, "h1", "web1")
	if err != nil {
		t.Fatal(err)
	}
	// The first viewer sees what the guest printed before (the log's end).
	if out := readUntil(t, a, "guest login: "); !strings.Contains(out, "before anyone attached") {
		t.Errorf("the first viewer's replay lacks the earlier output: %q", out)
	}
	b, err := relay.AttachConsole(ctx, nc2, env.Names, "h1", "web1")
	if err != nil {
		t.Fatal(err)
	}
	// b attached after the banner: it is replayed.
	readUntil(t, b, "guest login: ")
	if _, err := a.Write([]byte("from-a\n")); err != nil {
		t.Fatal(err)
	}
	readUntil(t, a, "echo: from-a")
	readUntil(t, b, "echo: from-a")
	if _, err := b.Write([]byte("from-b\n")); err != nil {
		t.Fatal(err)
	}
	readUntil(t, a, "echo: from-b")
	readUntil(t, b, "echo: from-b")

	// b stops reading while the guest floods; a keeps reading.
	if _, err := a.Write([]byte("flood\n")); err != nil {
		t.Fatal(err)
	}
	var aGot atomic.Int64
	stopA := make(chan struct{})
	aDone := make(chan struct{})
	go func() {
		defer close(aDone)
		buf := make([]byte, 64<<10)
		for {
			select {
			case <-stopA:
				return
			default:
			}
			n, err := a.Read(buf)
			aGot.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	const stall = 3 * time.Second
	w0 := g.written.Load()
	time.Sleep(stall)
	w1 := g.written.Load()
	t.Logf("while b did not read for %v: the guest wrote %d bytes, a read %d, b holds %d messages (at most %d), b's client dropped %d",
		stall, w1-w0, aGot.Load(), b.Buffered(), relay.ViewerBuffer, b.Dropped())
	if w1-w0 < 4*relay.ViewerBuffer*1024 {
		t.Errorf("the guest wrote only %d bytes in %v while a viewer did not read: it was held up", w1-w0, stall)
	}
	if b.Buffered() > relay.ViewerBuffer {
		t.Errorf("the stalled viewer holds %d messages, more than its bound %d", b.Buffered(), relay.ViewerBuffer)
	}
	if _, err := a.Write([]byte("stop\n")); err != nil {
		t.Fatal(err)
	}
	// b reads again: it is told it lost output, and goes on.
	out := readUntil(t, b, "bytes of console output lost")
	if b.Lost == 0 {
		t.Errorf("b lost no output? (%d bytes of it)", len(out))
	}
	if _, err := b.Write([]byte("after\n")); err != nil {
		t.Fatal(err)
	}
	readUntil(t, b, "echo: after")
	close(stopA)

	// The console closes: b is told so.
	c := <-g.conn
	_ = c.Close()
	buf := make([]byte, 1<<20)
	var closed *relay.ClosedError
	for {
		_, err := b.Read(buf)
		if err != nil {
			if !errors.As(err, &closed) {
				t.Fatalf("after the console closed: %v", err)
			}
			break
		}
	}
	_ = a.Close()
	_ = b.Close()
}

// A tunnel carries a TCP connection both ways, in order and complete,
// with half-close; the guest's banner arrives before anything is sent.
func TestTunnel(t *testing.T) {
	env := testenv.New(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The guest's port: a banner, then it returns the sha256 of all it
	// reads, and closes.
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = c.Write([]byte("SSH-2.0-test\r\n"))
				h := sha256.New()
				_, _ = io.Copy(h, c)
				_, _ = fmt.Fprintf(c, "%x", h.Sum(nil))
			}()
		}
	}()
	serve(t, env, &target{addr: func(port int) (string, error) {
		if port != 22 {
			return "", &relay.StatusError{Code: "409", Err: fmt.Errorf("port %d is not reachable", port)}
		}
		return ln.Addr().String(), nil
	}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// The near end: a TCP pair (it can half-close, as vmctl
	// port-forward's connections can).
	pl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pl.Close()
	client, err := net.Dial("tcp", pl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	near, err := pl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	tunErr := make(chan error, 1)
	go func() { tunErr <- relay.DialTunnel(ctx, env.NC, env.Names, "h1", "web1", 22, near) }()
	banner := make([]byte, len("SSH-2.0-test\r\n"))
	if _, err := io.ReadFull(client, banner); err != nil || string(banner) != "SSH-2.0-test\r\n" {
		t.Fatalf("banner %q, %v (tunnel: %v)", banner, err, <-tunErr)
	}
	payload := make([]byte, 8<<20)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, _ = client.Write(payload)
		_ = client.(*net.TCPConn).CloseWrite()
	}()
	sum, err := io.ReadAll(client)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("%x", sha256.Sum256(payload)); string(sum) != want {
		t.Fatalf("the guest saw sha256 %s, want %s", sum, want)
	}
	if err := <-tunErr; err != nil {
		t.Fatalf("tunnel: %v", err)
	}
	// A port the worker cannot reach: a clear error, nothing hangs.
	c2a, c2b := net.Pipe()
	defer c2a.Close()
	err = relay.DialTunnel(ctx, env.NC, env.Names, "h1", "web1", 80, c2b)
	var re *relay.ReplyError
	if !errors.As(err, &re) || re.Code != "409" || !strings.Contains(err.Error(), "port 80") {
		t.Fatalf("tunnel to an unreachable port: %v", err)
	}
	// A host nobody answers for.
	c3a, c3b := net.Pipe()
	defer c3a.Close()
	if err := relay.DialTunnel(ctx, env.NC, env.Names, "h9", "web1", 22, c3b); !errors.Is(err, relay.ErrNoResponders) {
		t.Fatalf("tunnel through a host with no worker: %v", err)
	}
}

// A viewer whose worker vanishes (no close message: its connection is
// gone) is told so once the hub has been silent too long, instead of
// waiting for ever; a quiet console with its hub alive is pinged.
func TestConsoleWorkerGone(t *testing.T) {
	env := testenv.New(t)
	g := newGuest(t)
	_, wnc := serveConn(t, env, &target{ep: api.ConsoleEndpoint{Kind: api.ConsoleUnixSocket, Path: g.ln.Addr().String()}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := relay.AttachConsole(ctx, env.NC, env.Names, "h1", "web1")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	readUntil(t, c, "guest login: ")
	// Quiet for longer than a ping: still attached.
	c.Silence = relay.ConsolePing + 2*time.Second
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 256)
		for {
			if _, err := c.Read(buf); err != nil {
				done <- err
				return
			}
		}
	}()
	select {
	case err := <-done:
		t.Fatalf("a quiet console with its worker alive ended: %v", err)
	case <-time.After(relay.ConsolePing + 4*time.Second):
	}
	wnc.Close() // the worker is gone, without a word
	select {
	case err := <-done:
		if !errors.Is(err, relay.ErrSilent) {
			t.Fatalf("after the worker vanished: %v, want ErrSilent", err)
		}
	case <-time.After(relay.ConsolePing + 10*time.Second):
		t.Fatal("the viewer never noticed its worker was gone")
	}
}

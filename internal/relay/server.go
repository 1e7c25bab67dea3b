package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/origin"
	"github.com/vmherd/vmherd/internal/vm"
)

// Target is what the far end needs from its worker, about the VMs on its
// host.
type Target interface {
	// ConsoleEndpoint is the backend's console of a VM on this host.
	ConsoleEndpoint(ctx context.Context, vmName string) (vm.ConsoleEndpoint, error)
	// GuestAddr is the address (host:port) at which this host reaches the
	// guest's TCP port.
	GuestAddr(ctx context.Context, vmName string, port int) (string, error)
}

// StatusError is an error with the status code the reply carries (400,
// 404, 409, 500, as the worker's queries).
type StatusError struct {
	Code string
	Err  error
}

func (e *StatusError) Error() string { return e.Err.Error() }
func (e *StatusError) Unwrap() error { return e.Err }

// Server is the far end on a worker: consoles (one Hub per VM, kept while
// the console is open), log reads and tunnels, as endpoints of the
// worker's micro service.
type Server struct {
	NC     *nats.Conn
	Names  events.Names
	Host   string
	Log    *slog.Logger
	Target Target
	// Dial opens a console endpoint (Dial in this package, or a test's).
	Dial func(ctx context.Context, ep vm.ConsoleEndpoint) (io.ReadWriteCloser, error)

	mu      sync.Mutex
	hubs    map[string]*Hub
	ctx     context.Context
	cancel  context.CancelFunc
	tunnels sync.WaitGroup
}

// AddEndpoints adds console_attach, console_log and tunnel_open to svc.
func (s *Server) AddEndpoints(svc micro.Service) error {
	if s.Dial == nil {
		s.Dial = Dial
	}
	s.hubs = map[string]*Hub{}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	// Only requests a client sent itself (origin.Guard), not copies the
	// server delivered to these subjects on someone's behalf.
	return errors.Join(
		svc.AddEndpoint("console_attach", origin.Guard(s.Log, micro.HandlerFunc(s.attach)),
			micro.WithEndpointSubject(s.Names.Console(s.Host, "*", events.ConsoleAttach))),
		svc.AddEndpoint("console_log", origin.Guard(s.Log, micro.HandlerFunc(s.log)),
			micro.WithEndpointSubject(s.Names.Log(s.Host, "*"))),
		svc.AddEndpoint("tunnel_open", origin.Guard(s.Log, micro.HandlerFunc(s.open)),
			micro.WithEndpointSubject(s.Names.Tunnel(s.Host, "*", "*", events.TunnelOpen))),
	)
}

// Close ends every console hub and tunnel.
func (s *Server) Close() {
	if s.cancel == nil {
		return
	}
	s.cancel()
	s.mu.Lock()
	hubs := make([]*Hub, 0, len(s.hubs))
	for _, h := range s.hubs {
		hubs = append(hubs, h)
	}
	s.mu.Unlock()
	for _, h := range hubs {
		h.Close()
	}
	s.tunnels.Wait()
}

func respondErr(req micro.Request, err error) {
	code := "500"
	var se *StatusError
	if errors.As(err, &se) {
		code = se.Code
	}
	_ = req.Error(code, err.Error(), nil)
}

// vmOf takes the VM name from the subject's fourth token
// (vm.console.<host>.<vm>.…, vm.log.<host>.<vm>, vm.tunnel.<host>.<vm>.…).
func (s *Server) vmOf(subject string) (string, error) {
	tok := strings.Split(strings.TrimPrefix(subject, s.Names.Prefix+"."), ".")
	if len(tok) < 3 {
		return "", &StatusError{"400", fmt.Errorf("subject %q names no VM", subject)}
	}
	if err := vm.ValidateName(tok[2]); err != nil {
		return "", &StatusError{"400", err}
	}
	return tok[2], nil
}

func (s *Server) attach(req micro.Request) {
	name, err := s.vmOf(req.Subject())
	if err != nil {
		respondErr(req, err)
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, 20*time.Second)
	defer cancel()
	h, err := s.hub(ctx, name)
	if err != nil {
		respondErr(req, err)
		return
	}
	data, end := h.Replay()
	_ = req.Respond(data, micro.WithHeaders(micro.Headers{HdrOffset: {strconv.FormatUint(end, 10)}}))
}

// hub returns the VM's running hub, or opens its console and starts one.
func (s *Server) hub(ctx context.Context, name string) (*Hub, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if h, ok := s.hubs[name]; ok {
		select {
		case <-h.Done():
		default:
			return h, nil
		}
	}
	ep, err := s.Target.ConsoleEndpoint(ctx, name)
	if err != nil {
		return nil, err
	}
	conn, err := s.Dial(ctx, ep)
	if err != nil {
		return nil, &StatusError{"409", err}
	}
	// What the guest printed before: the end of its console log, read
	// after connecting (so nothing falls between; a few bytes may show
	// twice).
	var seed []byte
	if ep.LogPath != "" {
		seed = tailOfFile(ep.LogPath, ReplaySize)
	}
	var h *Hub
	h, err = StartHub(s.NC, s.Names, s.Host, name, conn, seed, s.Log, func() {
		s.mu.Lock()
		if s.hubs[name] == h {
			delete(s.hubs, name)
		}
		s.mu.Unlock()
	})
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	s.hubs[name] = h
	return h, nil
}

func (s *Server) log(req micro.Request) {
	name, err := s.vmOf(req.Subject())
	if err != nil {
		respondErr(req, err)
		return
	}
	lr, err := DecodeLogRequest(nats.Header(req.Headers()))
	if err != nil {
		respondErr(req, &StatusError{"400", err})
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, 20*time.Second)
	defer cancel()
	ep, err := s.Target.ConsoleEndpoint(ctx, name)
	if err != nil {
		respondErr(req, err)
		return
	}
	part, err := ReadLog(ctx, ep, lr)
	if err != nil {
		respondErr(req, &StatusError{"409", err})
		return
	}
	data, h := LogReply(part)
	_ = req.Respond(data, micro.WithHeaders(micro.Headers(h)))
}

func (s *Server) open(req micro.Request) {
	name, err := s.vmOf(req.Subject())
	if err != nil {
		respondErr(req, err)
		return
	}
	tok := strings.Split(req.Subject(), ".")
	id := tok[len(tok)-2]
	if !ValidTunnelID(id) {
		respondErr(req, &StatusError{"400", fmt.Errorf("tunnel id %q: want 24 lowercase hex digits", id)})
		return
	}
	port, err := strconv.Atoi(req.Headers().Get(HdrPort))
	if err != nil || port < 1 || port > 65535 {
		respondErr(req, &StatusError{"400", fmt.Errorf("header %s: want a TCP port, 1..65535", HdrPort)})
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, 20*time.Second)
	defer cancel()
	addr, err := s.Target.GuestAddr(ctx, name, port)
	if err != nil {
		respondErr(req, err)
		return
	}
	var d net.Dialer
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	conn, err := d.DialContext(dctx, "tcp", addr)
	dcancel()
	if err != nil {
		respondErr(req, &StatusError{"409", fmt.Errorf("connecting to %s port %d (%s): %w", name, port, addr, err)})
		return
	}
	up := make(chan *nats.Msg, TunnelBuffer)
	sub, err := s.NC.ChanSubscribe(s.Names.Tunnel(s.Host, name, id, events.TunnelUp), up)
	if err != nil {
		_ = conn.Close()
		respondErr(req, err)
		return
	}
	_ = sub.SetPendingLimits(TunnelBuffer, TunnelBuffer*tunnelChunk)
	if err := req.Respond(nil); err != nil {
		_ = sub.Unsubscribe()
		_ = conn.Close()
		return
	}
	s.tunnels.Add(1)
	go func() {
		defer s.tunnels.Done()
		defer func() { _ = sub.Unsubscribe() }()
		if err := Splice(s.ctx, s.NC, s.Names.Tunnel(s.Host, name, id, events.TunnelDown), up, conn); err != nil {
			s.Log.Debug("tunnel ended", "vm", name, "port", port, "err", err)
		}
	}()
}

// tailOfFile is the last n bytes of a file (nil when it cannot be read).
func tailOfFile(path string, n int64) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil
	}
	off := max(fi.Size()-n, 0)
	b := make([]byte, fi.Size()-off)
	k, _ := f.ReadAt(b, off)
	return b[:k]
}

package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/vmherd/vmherd/internal/origin"
)

// Target is what the far end needs from its worker, about the VMs on its
// host.
type Target interface {
	// ConsoleEndpoint is the backend's console of a VM on this host.
	ConsoleEndpoint(ctx context.Context, vmName string) (api.ConsoleEndpoint, error)
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

// Limits bound what the relay holds on its host for others: tunnels
// (each a TCP connection to a guest, its goroutines and at most a
// window of data waiting for the guest) and the time a guest may take to
// read. docs/trust.md, "Memory an operator can pin", has the reasons.
type Limits struct {
	// Tunnels open or opening on this host, and per requester
	// (Requester); an open past either is refused at once (429).
	Tunnels, TunnelsPerRequester int
	// WriteTimeout: a guest that reads nothing of what its tunnel
	// carries for this long ends the tunnel.
	WriteTimeout time.Duration
}

// Default limits (worker flags --tunnels, --tunnels-per-identity).
const (
	DefaultTunnels             = 256
	DefaultTunnelsPerRequester = 32
)

// withDefaults fills in the zero limits.
func (l Limits) withDefaults() Limits {
	if l.Tunnels <= 0 {
		l.Tunnels = DefaultTunnels
	}
	if l.TunnelsPerRequester <= 0 {
		l.TunnelsPerRequester = DefaultTunnelsPerRequester
	}
	if l.WriteTimeout <= 0 {
		l.WriteTimeout = TunnelWriteTimeout
	}
	return l
}

// Requester names who sent a request, from its reply subject: the inbox
// prefix a connection's requests share. With vmherd's per-identity inbox
// prefixes (<root>.<role>.<name>, then the connection's token and the
// request's) that is the identity: the reply without its last two
// tokens; with a plain _INBOX.<connection>.<request> it is the
// connection: the reply without its last token. The server does not
// check a reply subject against its sender's permissions, so a client
// can name another's inbox: the per-requester limits keep honest clients
// from crowding each other out, Limits.Tunnels bounds them all, and the
// tunnel's key (HdrKey, sent to the reply subject) keeps a tunnel opened
// in another's name from being used.
func Requester(reply string) string {
	tok := strings.Split(reply, ".")
	switch {
	case len(tok) >= 4:
		tok = tok[:len(tok)-2]
	case len(tok) >= 2:
		tok = tok[:len(tok)-1]
	}
	return strings.Join(tok, ".")
}

// Server is the far end on a worker: consoles (one Hub per VM, kept while
// the console is open), log reads and tunnels, as endpoints of the
// worker's micro service.
type Server struct {
	NC     *nats.Conn
	Names  api.Names
	Host   string
	Log    *slog.Logger
	Target Target
	// Dial opens a console endpoint: the backend's dialer (default
	// DialUnix, QEMU's socket). History reads a console's output for an
	// endpoint without a log file (nil: none).
	Dial    func(ctx context.Context, ep api.ConsoleEndpoint) (io.ReadWriteCloser, error)
	History History
	// Limits bound the tunnels (zero fields: the defaults).
	Limits Limits

	mu      sync.Mutex
	hubs    map[string]*Hub
	ctx     context.Context
	cancel  context.CancelCauseFunc
	tunnels sync.WaitGroup
	// open tunnels (and opens in progress): all, and per requester
	nTunnels int
	byReq    map[string]int
	stopping bool // Close has begun: no new tunnels
}

// errStopping ends the tunnels when the worker stops.
var errStopping = errors.New("the worker is stopping")

// AddEndpoints adds console_attach, console_log and tunnel_open to svc.
func (s *Server) AddEndpoints(svc micro.Service) error {
	if s.Dial == nil {
		s.Dial = DialUnix
	}
	s.Limits = s.Limits.withDefaults()
	s.hubs = map[string]*Hub{}
	s.byReq = map[string]int{}
	s.ctx, s.cancel = context.WithCancelCause(context.Background())
	// Only requests a client sent itself (origin.Guard), not copies the
	// server delivered to these subjects on someone's behalf. Requests
	// have empty bodies: what waits for a handler is bounded
	// (the client drops the rest, and their senders time out) instead of
	// the client's default 64 MB.
	return errors.Join(
		svc.AddEndpoint("console_attach", origin.Guard(s.Log, micro.HandlerFunc(s.attach)),
			micro.WithEndpointSubject(s.Names.Console(s.Host, "*", api.ConsoleAttach)),
			micro.WithEndpointPendingLimits(1024, 1<<20)),
		svc.AddEndpoint("console_log", origin.Guard(s.Log, micro.HandlerFunc(s.log)),
			micro.WithEndpointSubject(s.Names.Log(s.Host, "*")),
			micro.WithEndpointPendingLimits(1024, 1<<20)),
		// Opens are answered at once (refused, or handed to a goroutine
		// of their own): a small buffer is plenty, and a flood of big
		// messages is dropped by the client instead of held.
		svc.AddEndpoint("tunnel_open", origin.Guard(s.Log, micro.HandlerFunc(s.open)),
			micro.WithEndpointSubject(s.Names.Tunnel(s.Host, "*", "*", api.TunnelOpen)),
			micro.WithEndpointPendingLimits(4096, 4<<20)),
	)
}

// Close ends every console hub and tunnel (the tunnels' clients are told
// the worker is stopping), and returns when they have ended.
func (s *Server) Close() {
	if s.cancel == nil {
		return
	}
	s.mu.Lock()
	s.stopping = true // no tunnel is counted in after this
	s.mu.Unlock()
	s.cancel(errStopping)
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

// Tunnels is how many tunnels are open or opening on this host.
func (s *Server) Tunnels() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nTunnels
}

// admit counts a tunnel for who (in s.tunnels too), or says which limit
// it would pass.
func (s *Server) admit(who string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.stopping:
		return &StatusError{"503", errStopping}
	case s.nTunnels >= s.Limits.Tunnels:
		return &StatusError{"429", fmt.Errorf("too many tunnels on host %s (%d open, the limit; worker flag --tunnels): try again later", s.Host, s.nTunnels)}
	case s.byReq[who] >= s.Limits.TunnelsPerRequester:
		return &StatusError{"429", fmt.Errorf("too many tunnels for %s on host %s (%d open, the limit; worker flag --tunnels-per-identity): close some first", who, s.Host, s.byReq[who])}
	}
	s.nTunnels++
	s.byReq[who]++
	s.tunnels.Add(1)
	return nil
}

func (s *Server) release(who string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nTunnels--
	if s.byReq[who]--; s.byReq[who] <= 0 {
		delete(s.byReq, who)
	}
}

func respondErr(req errorResponder, err error) {
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
	if err := api.ValidateName(tok[2]); err != nil {
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
		seed = lastBytes(ep.LogPath, ReplaySize)
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
	part, err := ReadLog(ctx, ep, lr, s.History)
	if err != nil {
		respondErr(req, &StatusError{"409", err})
		return
	}
	data, h := LogReply(part)
	_ = req.Respond(data, micro.WithHeaders(micro.Headers(h)))
}

// open takes a tunnel open: checked and counted here, then connected in
// a goroutine of its own, so one requester's slow or many opens hold up
// no one else's.
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
	who := Requester(req.Reply())
	if err := s.admit(who); err != nil {
		respondErr(req, err)
		return
	}
	ans := detached{nc: s.NC, reply: req.Reply()}
	go func() {
		defer s.tunnels.Done()
		defer s.release(who)
		s.serveTunnel(ans, name, id, port)
	}()
}

// detached answers a request after its handler has returned: micro's
// Request must not be used then (the service reads what Respond and Error
// set on it once the handler returns, racing a later call: the race
// detector caught it in TestTunnel). It publishes what they would.
type detached struct {
	nc    *nats.Conn
	reply string
}

func (d detached) Error(code, description string, _ []byte, _ ...micro.RespondOpt) error {
	m := nats.NewMsg(d.reply)
	m.Header.Set(micro.ErrorHeader, description)
	m.Header.Set(micro.ErrorCodeHeader, code)
	return d.nc.PublishMsg(m)
}

// RespondHeaders answers with headers and no body.
func (d detached) RespondHeaders(h nats.Header) error {
	m := nats.NewMsg(d.reply)
	m.Header = h
	return d.nc.PublishMsg(m)
}

// errorResponder is what respondErr needs: a micro.Request, or detached.
type errorResponder interface {
	Error(code, description string, data []byte, opts ...micro.RespondOpt) error
}

// serveTunnel connects a tunnel to the guest's port and relays it until
// it ends.
func (s *Server) serveTunnel(req detached, name, id string, port int) {
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
	key := newTunnelKey()
	t, err := subscribeTunnel(s.NC, s.Names.Tunnel(s.Host, name, id, api.TunnelUp), s.Names.Tunnel(s.Host, name, id, api.TunnelDown), "", key, s.Limits.WriteTimeout)
	if err != nil {
		_ = conn.Close()
		respondErr(req, err)
		return
	}
	if err := req.RespondHeaders(nats.Header{HdrKey: {key}}); err != nil {
		t.unsubscribe()
		_ = conn.Close()
		return
	}
	if err := t.run(s.ctx, conn); err != nil {
		s.Log.Debug("tunnel ended", "vm", name, "port", port, "err", err)
	}
}

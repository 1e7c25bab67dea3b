// Package natsserver runs the embedded nats-server with JetStream on disk,
// which is vmherd's single-host default.
package natsserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/vmherd/vmherd/internal/auth"
)

// Options for the embedded server.
type Options struct {
	// Listen is host:port for clients (default 127.0.0.1:4222; port -1 picks one).
	Listen string
	// StoreDir holds JetStream's files.
	StoreDir string
	// Sync is JetStream's sync_interval: "always" (fsync every write), or a
	// duration such as "2m" (the nats-server default). See README: Durability.
	Sync string
	// ServerName names the server in logs and cluster views.
	ServerName string
	// Logger receives the server's notices (nil: quiet).
	Logger *slog.Logger
	// Auth, if set, admits only clients with credentials it signed; nil
	// admits anyone, which Start allows only on a loopback address.
	Auth *auth.Authority
}

// DefaultSync is vmherd's chosen default for Options.Sync; see README.
const DefaultSync = "always"

// DefaultMaxConsumers is the embedded server's limit of consumers per
// stream for the streams that set none: the KV buckets', whose readers
// are each engine's watch of VM_HOSTS and VM_IMAGES and the vmctl image
// pulls waiting on VM_IMAGES (events.ConsumerBound). Accounts have no
// consumer limit of their own (docs/architecture.md, "Consumers and
// their bound").
const DefaultMaxConsumers = 1000

// Server is a running embedded nats-server.
type Server struct {
	*server.Server
}

// Start starts the server and waits until it accepts clients.
func Start(o Options) (*Server, error) {
	if o.Listen == "" {
		o.Listen = "127.0.0.1:4222"
	}
	host, portStr, err := net.SplitHostPort(o.Listen)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: --listen %q is not host:port: %w", o.Listen, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: --listen port %q is not a number", portStr)
	}
	if o.StoreDir == "" {
		return nil, errors.New("embedded nats: no store directory given")
	}
	opts := &server.Options{
		ServerName: o.ServerName,
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   filepath.Join(o.StoreDir),
		NoSigs:     true,
		// The largest command and the event that carries it (auth.MaxPayload,
		// the account's limit too); NATS's own default is 1 MiB.
		MaxPayload: auth.MaxPayload,
		// Stated, not left to the server's default: the buckets' streams
		// take it (vmherd's three streams set their own, see
		// events.MaxConsumers).
		JetStreamLimits: server.JSLimitOpts{DefaultMaxConsumers: DefaultMaxConsumers},
	}
	if o.Auth != nil {
		if err := o.Auth.ConfigureServer(opts); err != nil {
			return nil, fmt.Errorf("embedded nats: %w", err)
		}
	} else if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("embedded nats: refusing to listen on %s without authentication: anyone who reaches it could drive root QEMU (drop --no-auth, or listen on 127.0.0.1)", o.Listen)
	}
	if o.Sync == "" {
		o.Sync = DefaultSync
	}
	switch o.Sync {
	case "always":
		opts.SyncAlways = true
		opts.SyncInterval = 2 * time.Minute
	case "default":
		// nats-server's own default (2m, data in the OS page cache).
	default:
		d, err := time.ParseDuration(o.Sync)
		if err != nil || d <= 0 {
			return nil, fmt.Errorf("embedded nats: --sync %q is neither \"always\", \"default\" nor a positive duration", o.Sync)
		}
		opts.SyncInterval = d
	}
	// Fail at once, with a clear message, when the address is taken: the
	// server itself would only log the bind error and never become ready.
	if err := precheckListen(o.Listen, port); err != nil {
		return nil, err
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	// The adapter is always installed: it catches the server's fatal start-up
	// errors (bind failure, JetStream store) so Start can return them.
	logs := &slogAdapter{l: o.Logger, fatal: make(chan fatal, 1)}
	ns.SetLoggerV2(logs, false, false, false)
	go ns.Start()
	// The pre-check's listener is closed before the server binds, so the
	// port may be taken in between: watch the server's own start as well.
	deadline := time.Now().Add(readyTimeout)
	for !ns.ReadyForConnections(50 * time.Millisecond) {
		select {
		case f := <-logs.fatal:
			ns.Shutdown()
			return nil, f.err(o.Listen)
		default:
		}
		if time.Now().After(deadline) {
			ns.Shutdown()
			return nil, fmt.Errorf("embedded nats: not ready after %s on %s (is the port in use? pick another with --listen)", readyTimeout, o.Listen)
		}
	}
	return &Server{Server: ns}, nil
}

// readyTimeout bounds the server's start (JetStream recovers its store first).
const readyTimeout = 30 * time.Second

// ListenError is returned by Start when the client address cannot be bound.
type ListenError struct {
	Addr string // host:port as given
	Err  error  // the cause, e.g. one wrapping syscall.EADDRINUSE
}

func (e *ListenError) Error() string {
	if errors.Is(e.Err, syscall.EADDRINUSE) {
		return fmt.Sprintf("listening on %s: address already in use (another engine or nats-server is running there; stop it or choose --listen)", e.Addr)
	}
	err := e.Err
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		err = op.Err // drop "listen tcp <addr>:", the address is said already
	}
	return fmt.Sprintf("listening on %s: %v (choose another address with --listen)", e.Addr, err)
}

func (e *ListenError) Unwrap() error { return e.Err }

// precheckListen binds addr and lets it go again, so a taken port is
// reported before the server starts. Port -1 (any) and 0 need no check.
// A variable so tests can exercise the check after start.
var precheckListen = func(addr string, port int) error {
	if port <= 0 {
		return nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return &ListenError{Addr: addr, Err: err}
	}
	return l.Close()
}

// Stop shuts the server down and waits for it.
func (s *Server) Stop() {
	s.Shutdown()
	s.WaitForShutdown()
}

// fatal is a fatal error the server logged, which ends its start.
type fatal struct {
	msg  string
	errs []error // error arguments of the message
}

// err turns a fatal start-up message into Start's error.
func (f fatal) err(listen string) error {
	for _, e := range f.errs {
		var op *net.OpError
		if errors.As(e, &op) && op.Op == "listen" {
			return &ListenError{Addr: listen, Err: e}
		}
	}
	return fmt.Errorf("embedded nats: %s", f.msg)
}

// slogAdapter passes the server's notices to l (nil: quiet) and hands the
// first fatal one to fatal.
type slogAdapter struct {
	l     *slog.Logger
	fatal chan fatal
	once  sync.Once
}

func (a *slogAdapter) log(level slog.Level, f string, v ...any) {
	if a.l != nil {
		a.l.Log(context.Background(), level, fmt.Sprintf(f, v...), "part", "nats")
	}
}

func (a *slogAdapter) Noticef(f string, v ...any) { a.log(slog.LevelDebug, f, v...) }
func (a *slogAdapter) Warnf(f string, v ...any)   { a.log(slog.LevelWarn, f, v...) }
func (a *slogAdapter) Errorf(f string, v ...any)  { a.log(slog.LevelError, f, v...) }
func (a *slogAdapter) Debugf(f string, v ...any)  { a.log(slog.LevelDebug, f, v...) }
func (a *slogAdapter) Tracef(f string, v ...any)  {}

func (a *slogAdapter) Fatalf(f string, v ...any) {
	a.log(slog.LevelError, f, v...)
	a.once.Do(func() {
		ft := fatal{msg: fmt.Sprintf(f, v...)}
		for _, x := range v {
			if e, ok := x.(error); ok {
				ft.errs = append(ft.errs, e)
			}
		}
		a.fatal <- ft // buffered; only the first is sent
	})
}

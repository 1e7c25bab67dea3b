// Package natsserver runs the embedded nats-server with JetStream on disk,
// which is vmherd's single-host default.
package natsserver

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
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
}

// DefaultSync is vmherd's chosen default for Options.Sync; see README.
const DefaultSync = "always"

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
		MaxPayload: 8 << 20,
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
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	if o.Logger != nil {
		ns.SetLoggerV2(&slogAdapter{l: o.Logger}, false, false, false)
	}
	go ns.Start()
	if !ns.ReadyForConnections(30 * time.Second) {
		ns.Shutdown()
		return nil, fmt.Errorf("embedded nats: not ready after 30s on %s (is the port in use? pick another with --listen)", o.Listen)
	}
	return &Server{Server: ns}, nil
}

// Stop shuts the server down and waits for it.
func (s *Server) Stop() {
	s.Shutdown()
	s.WaitForShutdown()
}

type slogAdapter struct{ l *slog.Logger }

func (a *slogAdapter) Noticef(f string, v ...any) { a.l.Debug(fmt.Sprintf(f, v...), "part", "nats") }
func (a *slogAdapter) Warnf(f string, v ...any)   { a.l.Warn(fmt.Sprintf(f, v...), "part", "nats") }
func (a *slogAdapter) Fatalf(f string, v ...any)  { a.l.Error(fmt.Sprintf(f, v...), "part", "nats") }
func (a *slogAdapter) Errorf(f string, v ...any)  { a.l.Error(fmt.Sprintf(f, v...), "part", "nats") }
func (a *slogAdapter) Debugf(f string, v ...any)  { a.l.Debug(fmt.Sprintf(f, v...), "part", "nats") }
func (a *slogAdapter) Tracef(f string, v ...any)  {}

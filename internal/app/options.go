// Package app wires vmherd's parts into the engine and worker processes:
// flags, environment, NATS connection, backends. cmd/* only call it.
package app

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/pflag"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/datadir"
)

// ConnOptions say how to reach NATS.
type ConnOptions struct {
	URL     string
	Creds   string
	TLSCert string
	TLSKey  string
	TLSCA   string
	Name    string
	// InboxPrefix replaces _INBOX for this connection's replies when
	// Creds names none (each identity's credentials allow only its own,
	// auth.CredsInboxPrefix, which Connect uses).
	InboxPrefix string
}

// AddFlags registers --nats-url, --creds and the TLS flags.
func (o *ConnOptions) AddFlags(fs *pflag.FlagSet, def string) {
	fs.StringVar(&o.URL, "nats-url", def, "NATS server URL(s), comma separated")
	fs.StringVar(&o.Creds, "creds", "", "NATS user credentials file")
	fs.StringVar(&o.TLSCert, "tls-cert", "", "client TLS certificate (PEM)")
	fs.StringVar(&o.TLSKey, "tls-key", "", "client TLS key (PEM)")
	fs.StringVar(&o.TLSCA, "tls-ca", "", "CA certificate(s) to verify the server (PEM)")
}

// Connect dials NATS once (clients: rebuild). Daemons use DialDaemon.
func (o *ConnOptions) Connect(daemon bool) (*nats.Conn, error) {
	opts, err := o.options()
	if err != nil {
		return nil, err
	}
	if daemon {
		opts = append(opts, nats.MaxReconnects(-1), nats.RetryOnFailedConnect(true), nats.ReconnectWait(250*time.Millisecond))
	}
	nc, err := nats.Connect(o.URL, opts...)
	if errors.Is(err, nats.ErrAuthorization) || err != nil && strings.Contains(err.Error(), "Authorization Violation") {
		return nil, fmt.Errorf("connecting to NATS at %s: %w (the server needs credentials: --creds FILE; an engine writes its own in <data-dir>/auth, and `engine creds` issues them for a worker, a user or another engine)", o.URL, err)
	}
	if err != nil {
		return nil, fmt.Errorf("connecting to NATS at %s: %w (is the engine running? set --nats-url or NATS_URL)", o.URL, err)
	}
	return nc, nil
}

// options are the connection's name, credentials, inbox prefix and TLS.
func (o *ConnOptions) options() ([]nats.Option, error) {
	opts := []nats.Option{nats.Name(o.Name)}
	inbox := o.InboxPrefix
	if o.Creds != "" {
		opts = append(opts, nats.UserCredentials(o.Creds))
		// Replies come only to the inbox prefix the credentials allow.
		p, err := auth.CredsInboxPrefix(o.Creds)
		if err != nil {
			return nil, fmt.Errorf("reading credentials %s: %w", o.Creds, err)
		}
		if p != "" {
			inbox = p
		}
	}
	if inbox != "" {
		opts = append(opts, nats.CustomInboxPrefix(inbox))
	}
	if o.TLSCert != "" || o.TLSKey != "" {
		opts = append(opts, nats.ClientCert(o.TLSCert, o.TLSKey))
	}
	if o.TLSCA != "" {
		opts = append(opts, nats.RootCAs(o.TLSCA))
	}
	return opts, nil
}

// ConnectJS dials NATS and opens its JetStream context.
func (o *ConnOptions) ConnectJS(daemon bool) (*nats.Conn, jetstream.JetStream, error) {
	nc, err := o.Connect(daemon)
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}

// BindEnv sets every flag the command line left alone from VMHERD_<FLAG>
// (upper case, '-' -> '_'), so VMHERD_DATA_DIR=/x equals --data-dir /x.
func BindEnv(fs *pflag.FlagSet) error {
	var errs []string
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed {
			return
		}
		key := "VMHERD_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(key); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Sprintf("%s=%q: %v", key, v, err))
			}
		}
	})
	if len(errs) > 0 {
		return fmt.Errorf("bad environment: %s", strings.Join(errs, "; "))
	}
	return nil
}

// DefaultDataDir is $XDG_DATA_HOME/vmherd, else ~/.local/share/vmherd.
func DefaultDataDir() string { return datadir.Default() }

// NewLogger logs text to stderr at the given level (debug, info, warn, error).
func NewLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}

// StreamOptions are the stream and bucket settings an operator can set.
type StreamOptions struct {
	Prefix          string
	Replicas        int
	CommandsMaxAge  time.Duration
	DuplicateWindow time.Duration
}

// AddFlags registers the stream settings.
func (o *StreamOptions) AddFlags(fs *pflag.FlagSet) {
	d := jsetup.DefaultSettings
	fs.StringVar(&o.Prefix, "prefix", api.DefaultPrefix, "first token of every subject; streams and buckets are named <PREFIX>_*")
	fs.IntVar(&o.Replicas, "replicas", d.Replicas, "stream and bucket replicas (clustered NATS)")
	fs.DurationVar(&o.CommandsMaxAge, "commands-max-age", d.CommandsMaxAge, "how long VM_COMMANDS keeps commands for audit (0: forever)")
	fs.DurationVar(&o.DuplicateWindow, "duplicate-window", d.DuplicateWindow, "duplicate window of VM_EVENTS and VM_TASKS")
}

// Names and Settings derived from the options.
func (o *StreamOptions) Names() api.Names { return api.Names{Prefix: o.Prefix} }
func (o *StreamOptions) Settings() jsetup.Settings {
	return jsetup.Settings{Replicas: o.Replicas, CommandsMaxAge: o.CommandsMaxAge, DuplicateWindow: o.DuplicateWindow}
}

package client

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/credsfile"
	"github.com/vmherd/vmherd/internal/datadir"
	"github.com/vmherd/vmherd/internal/events"
)

// DefaultURL is the server a client connects to when neither Options.URL
// nor NATS_URL names one: the engine's embedded server on this machine.
const DefaultURL = "nats://127.0.0.1:4222"

// Options say how to reach vmherd. The zero value connects to DefaultURL
// without credentials; OptionsFromEnv fills them in the way vmctl and the
// nats CLI do.
type Options struct {
	// URL is the server, or a comma-separated list of a cluster's servers.
	URL string
	// Creds is a NATS credentials file (an identity `engine creds`
	// issued). The identity's name becomes the issuer token of every
	// command, and replies come to the inbox prefix its permissions allow;
	// both are read from the file.
	Creds string
	// TLSCA is a PEM file of the CA(s) a TLS server is checked against.
	TLSCA string
	// Prefix is the installation's subject prefix (api.DefaultPrefix).
	Prefix string
	// Name names the connection on the server (monitoring).
	Name string
	// NATSOptions are passed to nats.Connect after the ones above.
	NATSOptions []nats.Option
}

// OptionsFromEnv reads NATS_URL, NATS_CREDS and NATS_CA, and, when no
// credentials are named, uses the local engine's admin credentials if this
// user may read them (as kubectl uses a kubeconfig).
func OptionsFromEnv() Options {
	o := Options{URL: os.Getenv("NATS_URL"), Creds: os.Getenv("NATS_CREDS"), TLSCA: os.Getenv("NATS_CA")}
	if o.Creds == "" {
		o.Creds = datadir.LocalAdminCreds()
	}
	return o
}

// Client drives one vmherd installation over one NATS connection. It is
// safe for concurrent use.
type Client struct {
	nc     *nats.Conn
	js     jetstream.JetStream
	names  api.Names
	issuer string
	owned  bool // Close closes nc
	url    string

	mu      sync.Mutex
	records jetstream.KeyValue
	store   *events.Store
	down    time.Time // when the connection went down (zero: up)
}

// Connect connects to vmherd's NATS servers. It fails at once when no
// server answers, with an error that says what to try.
func Connect(ctx context.Context, o Options) (*Client, error) {
	if o.URL == "" {
		o.URL = DefaultURL
	}
	if o.Name == "" {
		o.Name = "vmherd-client"
	}
	c := &Client{url: o.URL, owned: true}
	opts := []nats.Option{
		nats.Name(o.Name),
		nats.Timeout(2 * time.Second),
		nats.MaxReconnects(-1),
		nats.DisconnectErrHandler(func(*nats.Conn, error) { c.setDown(true) }),
		nats.ReconnectHandler(func(*nats.Conn) { c.setDown(false) }),
		// Asynchronous errors (a refused subject) reach the caller through
		// the call that caused them, not the process's stderr.
		nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {}),
	}
	if o.Creds != "" {
		name, err := credsfile.Name(o.Creds)
		if err != nil {
			return nil, fmt.Errorf("reading credentials %s: %w", o.Creds, err)
		}
		if api.ValidateIdentity(name) == nil {
			c.issuer = name
		}
		inbox, err := credsfile.InboxPrefix(o.Creds)
		if err != nil {
			return nil, fmt.Errorf("reading credentials %s: %w", o.Creds, err)
		}
		opts = append(opts, nats.UserCredentials(o.Creds))
		if inbox != "" {
			opts = append(opts, nats.CustomInboxPrefix(inbox))
		}
	}
	if o.TLSCA != "" {
		opts = append(opts, nats.RootCAs(o.TLSCA))
	}
	opts = append(opts, o.NATSOptions...)
	nc, err := nats.Connect(o.URL, opts...)
	if err != nil {
		if strings.Contains(err.Error(), "Authorization Violation") {
			return nil, &ConnectError{URL: o.URL, Err: err, NeedsCreds: true}
		}
		return nil, &ConnectError{URL: o.URL, Err: err}
	}
	if err := c.init(nc, o.Prefix); err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// New makes a client on a connection the caller made and keeps: Close
// leaves it open. issuer is the identity's name (the issuer token commands
// carry; "" for an identity that may publish without one, an admin).
func New(nc *nats.Conn, prefix, issuer string) (*Client, error) {
	if issuer != "" {
		if err := api.ValidateIdentity(issuer); err != nil {
			return nil, err
		}
	}
	c := &Client{issuer: issuer, url: nc.ConnectedUrlRedacted()}
	return c, c.init(nc, prefix)
}

func (c *Client) init(nc *nats.Conn, prefix string) error {
	if prefix == "" {
		prefix = api.DefaultPrefix
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	c.nc, c.js, c.names = nc, js, api.Names{Prefix: prefix}
	return nil
}

// Close closes the connection Connect made.
func (c *Client) Close() {
	if c.owned {
		c.nc.Close()
	}
}

// Conn is the client's NATS connection.
func (c *Client) Conn() *nats.Conn { return c.nc }

// JetStream is the client's JetStream context.
func (c *Client) JetStream() jetstream.JetStream { return c.js }

// Names derives the installation's subjects, streams and buckets.
func (c *Client) Names() api.Names { return c.names }

// Issuer is the identity name commands carry as their issuer token ("" for
// an identity without one).
func (c *Client) Issuer() string { return c.issuer }

// URL is the server (list) the client connects to.
func (c *Client) URL() string { return c.url }

func (c *Client) setDown(down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case down && c.down.IsZero():
		c.down = time.Now()
	case !down:
		c.down = time.Time{}
	}
}

// DownSince is when the connection to NATS went down, or the zero time
// while it is up.
func (c *Client) DownSince() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.down
}

// eventStore opens VM_EVENTS once.
func (c *Client) eventStore(ctx context.Context) (*events.Store, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.store == nil {
		s, err := events.NewStore(ctx, c.js, c.names, "")
		if err != nil {
			return nil, c.wrapSetup(err, c.names.EventsStream())
		}
		c.store = s
	}
	return c.store, nil
}

// recordsKV opens VM_RECORDS once.
func (c *Client) recordsKV(ctx context.Context) (jetstream.KeyValue, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.records == nil {
		kv, err := c.js.KeyValue(ctx, c.names.RecordsBucket())
		if err != nil {
			return nil, c.wrapSetup(err, c.names.RecordsBucket())
		}
		c.records = kv
	}
	return c.records, nil
}

// wrapSetup explains a stream or bucket that cannot be opened.
func (c *Client) wrapSetup(err error, what string) error {
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound), errors.Is(err, jetstream.ErrBucketNotFound):
		return &NoEngineError{Reason: fmt.Sprintf("%s does not exist: no vmherd engine has run on %s", what, c.url)}
	}
	return notAllowed(fmt.Errorf("opening %s: %w", what, err))
}

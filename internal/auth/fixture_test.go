package auth_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/jspolicy"
	"github.com/vmherd/vmherd/internal/natsserver"
)

// The identities every trust test connects as: one per role, the worker
// role twice (two hosts), each with the name it signs commands with.
var identities = []auth.Identity{
	{Role: auth.RoleAdmin},
	{Role: auth.RoleEngine},
	{Role: auth.RoleOperator, User: "alice"},
	{Role: auth.RoleViewer, User: "dash"},
	{Role: auth.RoleWorker, Host: "h1"},
	{Role: auth.RoleWorker, Host: "h2"},
}

// fixture is an embedded server that trusts only a fresh authority, with
// vmherd's streams and buckets as the engines make them, and the engines'
// consumer policy running.
type fixture struct {
	t     *testing.T
	a     *auth.Authority
	url   string
	dir   string
	names api.Names
	// admin's connection, for setting up and checking.
	admin *client
}

// client is one identity's connection.
type client struct {
	id    auth.Identity
	creds string
	nc    *nats.Conn
	js    jetstream.JetStream
	perms jwt.Permissions
}

func newFixture(t *testing.T, policy bool) *fixture {
	t.Helper()
	dir := t.TempDir()
	a, err := auth.Open(filepath.Join(dir, "auth"))
	if err != nil {
		t.Fatal(err)
	}
	ns, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", StoreDir: filepath.Join(dir, "js"), Sync: "default", Auth: a})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Stop)
	f := &fixture{t: t, a: a, url: ns.ClientURL(), dir: dir, names: api.DefaultNames}
	f.admin = f.connect(auth.Identity{Role: auth.RoleAdmin, User: "setup"})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := jsetup.Ensure(ctx, f.admin.js, f.names, jsetup.DefaultSettings); err != nil {
		t.Fatal(err)
	}
	if policy {
		pctx, stop := context.WithCancel(context.Background())
		done := make(chan struct{})
		e := &jspolicy.Enforcer{JS: f.admin.js, Names: f.names, Log: slog.New(slog.DiscardHandler)}
		go func() { defer close(done); _ = e.Run(pctx) }()
		t.Cleanup(func() { stop(); <-done })
	}
	return f
}

// connect connects as id, with the inbox prefix its credentials allow.
func (f *fixture) connect(id auth.Identity) *client {
	f.t.Helper()
	b, err := f.a.IdentityCreds(id)
	if err != nil {
		f.t.Fatal(err)
	}
	path := filepath.Join(f.dir, id.Name()+".creds")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		f.t.Fatal(err)
	}
	opts := []nats.Option{nats.UserCredentials(path), nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {})}
	inbox, err := auth.CredsInboxPrefix(path)
	if err != nil {
		f.t.Fatal(err)
	}
	if inbox != "" {
		opts = append(opts, nats.CustomInboxPrefix(inbox))
	}
	nc, err := nats.Connect(f.url, opts...)
	if err != nil {
		f.t.Fatalf("connecting as %s: %v", id.Name(), err)
	}
	f.t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		f.t.Fatal(err)
	}
	tok, _ := jwt.ParseDecoratedJWT(b)
	uc, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		f.t.Fatal(err)
	}
	return &client{id: id, creds: path, nc: nc, js: js, perms: uc.Permissions}
}

// denied reports whether the server refused the last operation on subject
// (a publish or a subscription) for a permission: the -ERR comes before
// the PONG that ends the Flush.
func (c *client) denied(subject string) bool {
	if err := c.nc.Flush(); err != nil {
		return true
	}
	err := c.nc.LastError()
	return err != nil && errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), fmt.Sprintf("%q", subject))
}

// pub reports whether c may publish msg.
func (c *client) pub(m *nats.Msg) bool {
	if err := c.nc.PublishMsg(m); err != nil {
		return false
	}
	return !c.denied(m.Subject)
}

// sub reports whether c may subscribe to subject.
func (c *client) sub(subject string) bool {
	s, err := c.nc.SubscribeSync(subject)
	if err != nil {
		return false
	}
	defer func() { _ = s.Unsubscribe() }()
	return !c.denied(subject)
}

// request sends a JetStream API (or any) request and returns the answer,
// or ok false if the server refused the publish for a permission.
func (c *client) request(subject string, body []byte) (*nats.Msg, bool) {
	inbox := c.nc.NewInbox()
	s, err := c.nc.SubscribeSync(inbox)
	if err != nil {
		return nil, false
	}
	defer func() { _ = s.Unsubscribe() }()
	if err := c.nc.PublishRequest(subject, inbox, body); err != nil {
		return nil, false
	}
	if c.denied(subject) {
		return nil, false
	}
	m, err := s.NextMsg(5 * time.Second)
	if err != nil {
		return nil, true // allowed, and unanswered
	}
	return m, true
}

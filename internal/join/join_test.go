package join_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/join"
	"github.com/vmherd/vmherd/internal/natsserver"
)

func TestTokenRoundTripAndExpiry(t *testing.T) {
	tok := join.Token{Host: "h2", URLs: "nats://a:4222", Prefix: "vm", CA: "pem", Creds: "c", Expires: time.Now().Add(time.Hour).Truncate(time.Second)}
	got, err := join.Decode(tok.Encode(), time.Now())
	same := got.Expires.Equal(tok.Expires)
	got.Expires = tok.Expires
	if err != nil || got != tok || !same {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if _, err := join.Decode(tok.Encode(), time.Now().Add(2*time.Hour)); !errors.Is(err, join.ErrToken) || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired token: %v", err)
	}
	if _, err := join.Decode("hello", time.Now()); !errors.Is(err, join.ErrToken) {
		t.Fatalf("not a token: %v", err)
	}
}

// TestJoin: a host joins once with its token; the worker JWT is for the
// key it made and carries the worker role of that host; the same token
// again is refused; a token whose JWT expired is refused by the server.
func TestJoin(t *testing.T) {
	dir := t.TempDir()
	a, err := auth.Open(filepath.Join(dir, "auth"))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", StoreDir: filepath.Join(dir, "js"), Auth: a})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	url := srv.ClientURL()
	creds, _, err := a.LimitedCreds("join-service", join.ServicePermissions(), time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	svcJWT, _ := jwt.ParseDecoratedJWT(creds)
	kp, _ := jwt.ParseDecoratedNKey(creds)
	seed, _ := kp.Seed()
	nc, err := nats.Connect(url, nats.UserJWTAndSeed(svcJWT, string(seed)), nats.CustomInboxPrefix("_INBOX_VMHERD.join"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := &join.Service{Authority: a, URLs: url, Prefix: "vm", Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	go func() { _ = s.Serve(ctx, nc) }()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}

	tok, err := join.Issue(a, "h2", url, "vm", "", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tok.CA = "" // the embedded server here has no TLS
	jctx, jcancel := context.WithTimeout(ctx, 20*time.Second)
	defer jcancel()
	j, err := join.Join(jctx, tok)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := jwt.DecodeUserClaims(strings.TrimSpace(mustJWT(t, j.Creds)))
	if err != nil || uc.Name != "worker-h2" || j.Host != "h2" || j.URLs != url {
		t.Fatalf("joined: %+v, claims %+v, %v", j, uc, err)
	}
	if _, err := join.Join(jctx, tok); err == nil || !strings.Contains(err.Error(), "used already") {
		t.Fatalf("the same token again: %v", err)
	}

	short, err := join.Issue(a, "h3", url, "vm", "", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2100 * time.Millisecond)
	if _, err := join.Join(jctx, short); err == nil || !errors.Is(err, join.ErrToken) {
		t.Fatalf("an expired token: %v", err)
	}
}

func mustJWT(t *testing.T, creds []byte) string {
	s, err := jwt.ParseDecoratedJWT(creds)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

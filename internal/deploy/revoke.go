package deploy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/join"
)

// IssueToken makes a join token for host with the authority in dir.
func IssueToken(dir, host string, ttl time.Duration) (join.Token, error) {
	f, err := ReadFleet(dir)
	if err != nil {
		return join.Token{}, err
	}
	a, err := auth.Open(dir)
	if err != nil {
		return join.Token{}, err
	}
	return join.Issue(a, host, f.URLs, f.Prefix, f.CA, ttl)
}

// Revoked is what Revoke did.
type Revoked struct {
	Keys   []string // the user public keys revoked
	Kept   string   // the key kept (keepLatest)
	Pushed int      // the NATS nodes that took the new account JWT
	Nodes  int
}

// Revoke revokes the worker credentials of host (all of them, or all but
// the newest with keepLatest: rotation), then pushes the account JWT with
// the revocations to every NATS node. The servers close the connections
// of the revoked keys and refuse them from then on.
func Revoke(ctx context.Context, dir, host string, keepLatest bool) (Revoked, error) {
	var r Revoked
	f, err := ReadFleet(dir)
	if err != nil {
		return r, err
	}
	a, err := auth.Open(dir)
	if err != nil {
		return r, err
	}
	issued, err := a.IssuedTo(auth.Identity{Role: auth.RoleWorker, Host: host}.Name())
	if err != nil {
		return r, err
	}
	if len(issued) == 0 {
		return r, fmt.Errorf("no credentials were issued to host %s by the authority in %s", host, dir)
	}
	if keepLatest {
		r.Kept = issued[len(issued)-1].Pub
		issued = issued[:len(issued)-1]
		if len(issued) == 0 {
			return r, fmt.Errorf("host %s has only one key (%s): nothing older to revoke", host, r.Kept)
		}
	}
	for _, i := range issued {
		r.Keys = append(r.Keys, i.Pub)
	}
	if err := a.Revoke(r.Keys); err != nil {
		return r, err
	}
	r.Nodes = len(f.Nodes)
	r.Pushed, err = Push(ctx, a, f)
	return r, err
}

// Push sends the authority's account JWT to every node of the fleet.
func Push(ctx context.Context, a *auth.Authority, f Fleet) (int, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(f.CA)) {
		return 0, errors.New("fleet.json: the CA does not parse")
	}
	nc, err := nats.Connect(f.URLs, nats.Name("vmherd-authority"),
		nats.UserCredentials(filepath.Join(a.Dir, "sys.creds")),
		nats.Secure(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}), nats.Timeout(5*time.Second))
	if err != nil {
		return 0, fmt.Errorf("pushing the account JWT: connecting to %s: %w", f.URLs, err)
	}
	defer nc.Close()
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return a.Push(pctx, nc, len(f.Nodes))
}

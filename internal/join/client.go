package join

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// Joined is what a host gets by joining.
type Joined struct {
	Host, URLs, Prefix, CA string
	// Creds is the worker's credentials file: the JWT the authority
	// signed and the seed of the key made here.
	Creds []byte
	// Skew is this machine's clock minus the join service's, less half
	// the round trip.
	Skew time.Duration
}

// Join asks the fleet for host credentials with a token.
func Join(ctx context.Context, t Token) (Joined, error) {
	var opts []nats.Option
	if t.CA != "" { // always, but in tests against a plain server
		tc, err := tlsConfig(t.CA)
		if err != nil {
			return Joined{}, err
		}
		opts = append(opts, nats.Secure(tc))
	}
	boot, err := jwt.ParseDecoratedJWT([]byte(t.Creds))
	if err != nil {
		return Joined{}, fmt.Errorf("%w: its credentials: %w", ErrToken, err)
	}
	seed, err := jwt.ParseDecoratedNKey([]byte(t.Creds))
	if err != nil {
		return Joined{}, fmt.Errorf("%w: its credentials: %w", ErrToken, err)
	}
	bootSeed, _ := seed.Seed()
	nc, err := nats.Connect(t.URLs, append(opts, nats.Name("vmherd-join-"+t.Host),
		nats.UserJWTAndSeed(boot, string(bootSeed)), nats.CustomInboxPrefix(InboxPrefix(t.Host)),
		nats.Timeout(5*time.Second))...)
	if errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) {
		return Joined{}, fmt.Errorf("%w: the NATS servers refused it (%w): it expired, or is not this fleet's", ErrToken, err)
	}
	if err != nil {
		return Joined{}, fmt.Errorf("joining: connecting to %s: %w", t.URLs, err)
	}
	defer nc.Close()

	kp, err := nkeys.CreateUser()
	if err != nil {
		return Joined{}, err
	}
	pub, _ := kp.PublicKey()
	body, _ := json.Marshal(Request{Bootstrap: boot, Pub: pub})
	var m *nats.Msg
	sent := time.Now()
	// The engine with the authority may be starting: ask until ctx ends.
	for {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		m, err = nc.RequestWithContext(rctx, SubjectPrefix+t.Host, body)
		cancel()
		if err == nil || ctx.Err() != nil || !errors.Is(err, nats.ErrNoResponders) && !errors.Is(err, context.DeadlineExceeded) {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
		sent = time.Now()
	}
	if err != nil {
		return Joined{}, fmt.Errorf("joining: no answer on %s (%w): is the engine with the authority running (its config names authority-dir)?", SubjectPrefix+t.Host, err)
	}
	rtt := time.Since(sent)
	var rep Reply
	if err := json.Unmarshal(m.Data, &rep); err != nil {
		return Joined{}, fmt.Errorf("joining: the answer does not parse: %w", err)
	}
	if rep.Error != "" {
		return Joined{}, fmt.Errorf("%w refused: %s", ErrToken, rep.Error)
	}
	uc, err := jwt.DecodeUserClaims(rep.JWT)
	if err != nil || uc.Subject != pub {
		return Joined{}, fmt.Errorf("joining: the answer's JWT is not for the key made here")
	}
	// Whoever answered, the credentials must be the fleet's (signed by the
	// account that signed the token's) and for this host; the trust
	// anchor and the servers come from the token, never from the answer.
	bc, err := jwt.DecodeUserClaims(boot)
	if err != nil {
		return Joined{}, fmt.Errorf("%w: its credentials: %w", ErrToken, err)
	}
	if uc.Issuer != bc.Issuer || (uc.IssuerAccount != "" && uc.IssuerAccount != bc.IssuerAccount) {
		return Joined{}, fmt.Errorf("joining: the answer's JWT is not signed by the fleet's account (issuer %s, the token's %s)", uc.Issuer, bc.Issuer)
	}
	if rep.Host != "" && rep.Host != t.Host {
		return Joined{}, fmt.Errorf("joining: the answer is for host %s, not %s", rep.Host, t.Host)
	}
	rep.Host = t.Host
	if t.URLs != "" {
		rep.URLs = t.URLs
	}
	if t.CA != "" {
		rep.CA = t.CA
	}
	if t.Prefix != "" {
		rep.Prefix = t.Prefix
	}
	s, _ := kp.Seed()
	creds, err := jwt.FormatUserConfig(rep.JWT, s)
	if err != nil {
		return Joined{}, err
	}
	skew := sent.Add(rtt / 2).Sub(rep.Time)
	return Joined{Host: rep.Host, URLs: rep.URLs, Prefix: rep.Prefix, CA: rep.CA, Creds: creds, Skew: skew}, nil
}

package join

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/safefile"
)

// usedFile lists the tokens used (their bootstrap public keys), in the
// authority's directory.
const usedFile = "join-used.json"

// Service answers join requests with the authority.
type Service struct {
	Authority *auth.Authority
	URLs      string
	Prefix    string
	CA        string // PEM
	Log       *slog.Logger

	mu sync.Mutex
}

// Serve answers join requests on nc until ctx ends.
func (s *Service) Serve(ctx context.Context, nc *nats.Conn) error {
	sub, err := nc.Subscribe(SubjectPrefix+"*", func(m *nats.Msg) {
		rep := s.answer(strings.TrimPrefix(m.Subject, SubjectPrefix), m.Data)
		rep.Time = time.Now()
		b, _ := json.Marshal(rep)
		if err := m.Respond(b); err != nil {
			s.Log.Warn("join: answering failed", "subject", m.Subject, "err", err)
		}
	})
	if err != nil {
		return fmt.Errorf("join: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	s.Log.Info("join service: hosts with a token may join", "subject", SubjectPrefix+"<host>")
	<-ctx.Done()
	return nil
}

func (s *Service) answer(host string, data []byte) Reply {
	var req Request
	if err := json.Unmarshal(data, &req); err != nil {
		return Reply{Error: "a join request is JSON: " + err.Error()}
	}
	uc, err := jwt.DecodeUserClaims(req.Bootstrap)
	if err != nil {
		return Reply{Error: "the token's JWT does not parse: " + err.Error()}
	}
	// The servers let only this host's tokens publish here; check anyway
	// that the JWT is one of ours, for this host, and current.
	vr := jwt.CreateValidationResults()
	uc.Validate(vr)
	switch {
	case uc.Issuer != s.Authority.AccountPub:
		return Reply{Error: "the token was not issued by this fleet's authority"}
	case uc.Name != "join-"+host:
		return Reply{Error: fmt.Sprintf("the token is for %q, not for host %s", strings.TrimPrefix(uc.Name, "join-"), host)}
	case vr.IsBlocking(true) || uc.Expires == 0 || time.Unix(uc.Expires, 0).Before(time.Now()):
		return Reply{Error: "the token has expired: issue a new one with engine token --host " + host}
	}
	if err := api.ValidateHost(host); err != nil {
		return Reply{Error: "host: " + err.Error()}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	used, err := s.used()
	if err != nil {
		s.Log.Error("join: reading the used tokens", "err", err)
		return Reply{Error: "the join service cannot read its records; see the engine's log"}
	}
	if slices.Contains(used, uc.Subject) {
		s.Log.Warn("join: a used token was offered again", "host", host, "token", uc.Subject)
		return Reply{Error: "this token was used already: a token works once; issue a new one with engine token --host " + host}
	}
	// Marked used before the JWT is signed: a crash in between wastes the
	// token, never lets it work twice.
	if err := s.markUsed(append(used, uc.Subject)); err != nil {
		s.Log.Error("join: recording the used token", "err", err)
		return Reply{Error: "the join service cannot write its records; see the engine's log"}
	}
	tok, err := s.Authority.UserJWT(auth.Identity{Role: auth.RoleWorker, Host: host, Names: api.Names{Prefix: s.Prefix}}, req.Pub, time.Time{})
	if err != nil {
		return Reply{Error: err.Error()}
	}
	s.Log.Info("join: host joined", "host", host, "worker_key", req.Pub, "token", uc.Subject)
	return Reply{JWT: tok, Host: host, URLs: s.URLs, Prefix: s.Prefix, CA: s.CA}
}

func (s *Service) used() ([]string, error) {
	b, err := os.ReadFile(filepath.Join(s.Authority.Dir, usedFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var used []string
	return used, json.Unmarshal(b, &used)
}

func (s *Service) markUsed(used []string) error {
	b, _ := json.Marshal(used)
	return safefile.Write(filepath.Join(s.Authority.Dir, usedFile), b, 0o600)
}

// Issue makes a join token for host, valid for ttl.
func Issue(a *auth.Authority, host, urls, prefix, caPEM string, ttl time.Duration) (Token, error) {
	if err := api.ValidateHost(host); err != nil {
		return Token{}, fmt.Errorf("host %q: %w", host, err)
	}
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	exp := time.Now().Add(ttl)
	creds, _, err := a.LimitedCreds("join-"+host, BootstrapPermissions(host), exp)
	if err != nil {
		return Token{}, err
	}
	return Token{Host: host, URLs: urls, Prefix: prefix, CA: caPEM, Creds: string(creds), Expires: exp.Truncate(time.Second)}, nil
}

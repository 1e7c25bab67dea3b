package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// Issued is one user JWT the authority signed, as its ledger
// (<dir>/issued.jsonl) keeps it: what revocation needs to find a host's
// keys.
type Issued struct {
	Name    string `json:"name"`
	Pub     string `json:"pub"`
	At      int64  `json:"at"`
	Expires int64  `json:"expires,omitempty"`
}

const (
	ledgerFile      = "issued.jsonl"
	revocationsFile = "revocations.json"
)

// record appends an issued JWT to the ledger.
func (a *Authority) record(name, pub string, expires int64) error {
	b, _ := json.Marshal(Issued{Name: name, Pub: pub, At: time.Now().Unix(), Expires: expires})
	f, err := os.OpenFile(filepath.Join(a.Dir, ledgerFile), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("auth: ledger: %w", err)
	}
	defer f.Close()
	if _, err := f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("auth: ledger: %w", err)
	}
	return nil
}

// IssuedTo lists the user JWTs signed for an identity name (e.g.
// "worker-h2"), oldest first.
func (a *Authority) IssuedTo(name string) ([]Issued, error) {
	b, err := os.ReadFile(filepath.Join(a.Dir, ledgerFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("auth: ledger: %w", err)
	}
	var out []Issued
	for _, l := range strings.Split(string(b), "\n") {
		var i Issued
		if json.Unmarshal([]byte(l), &i) == nil && i.Name == name {
			out = append(out, i)
		}
	}
	return out, nil
}

// revocations reads <dir>/revocations.json: user public key -> unix time
// before which its JWTs are revoked.
func (a *Authority) revocations() (jwt.RevocationList, error) {
	b, err := os.ReadFile(filepath.Join(a.Dir, revocationsFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}
	var r jwt.RevocationList
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("auth: %s: %w", revocationsFile, err)
	}
	return r, nil
}

// Revoke revokes every JWT issued so far to the given user public keys:
// it records them, and re-signs the account JWT with them (AccountJWT).
// The servers learn of it when the account JWT reaches them (Push).
func (a *Authority) Revoke(pubs []string) error {
	r, err := a.revocations()
	if err != nil {
		return err
	}
	if r == nil {
		r = jwt.RevocationList{}
	}
	// One second ahead: a JWT issued in the current second is revoked too.
	now := time.Now().Unix() + 1
	for _, p := range pubs {
		if !nkeys.IsValidPublicUserKey(p) {
			return fmt.Errorf("auth: revoke: %q is not a user public key", p)
		}
		r[p] = now
	}
	b, _ := json.MarshalIndent(r, "", "  ")
	if err := writeFile(filepath.Join(a.Dir, revocationsFile), b); err != nil {
		return err
	}
	return a.signAccount()
}

// UserJWT signs a JWT for a user public key whose seed the caller keeps
// (a joining host makes its own key: its seed never travels), with id's
// role permissions, expiring at expires (zero: never).
func (a *Authority) UserJWT(id Identity, pub string, expires time.Time) (string, error) {
	if !nkeys.IsValidPublicUserKey(pub) {
		return "", fmt.Errorf("auth: %q is not a user public key", pub)
	}
	perms, err := id.Permissions()
	if err != nil {
		return "", err
	}
	uc := jwt.NewUserClaims(pub)
	uc.Name = id.Name()
	uc.Permissions = perms
	uc.Limits.Subs = id.subs()
	if !expires.IsZero() {
		uc.Expires = expires.Unix()
	}
	tok, err := uc.Encode(a.acct)
	if err != nil {
		return "", fmt.Errorf("auth: user jwt for %s: %w", id.Name(), err)
	}
	return tok, a.record(uc.Name, pub, uc.Expires)
}

// IdentityCredsUntil is IdentityCreds expiring at expires.
func (a *Authority) IdentityCredsUntil(id Identity, expires time.Time) ([]byte, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	pub, _ := kp.PublicKey()
	tok, err := a.UserJWT(id, pub, expires)
	if err != nil {
		return nil, err
	}
	seed, _ := kp.Seed()
	return jwt.FormatUserConfig(tok, seed)
}

// LimitedCreds are credentials with the given permissions, expiring at
// expires (zero: never), and the user's public key (join tokens).
func (a *Authority) LimitedCreds(name string, perms jwt.Permissions, expires time.Time) ([]byte, string, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, "", err
	}
	pub, _ := kp.PublicKey()
	uc := jwt.NewUserClaims(pub)
	uc.Name = name
	uc.Permissions = perms
	if !expires.IsZero() {
		uc.Expires = expires.Unix()
	}
	tok, err := uc.Encode(a.acct)
	if err != nil {
		return nil, "", err
	}
	if err := a.record(name, pub, uc.Expires); err != nil {
		return nil, "", err
	}
	seed, _ := kp.Seed()
	b, err := jwt.FormatUserConfig(tok, seed)
	return b, pub, err
}

// SystemCreds are credentials of a user of the system account: what
// pushes account JWTs to the servers (Push). Keep them with the authority.
func (a *Authority) SystemCreds() ([]byte, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	pub, _ := kp.PublicKey()
	uc := jwt.NewUserClaims(pub)
	uc.Name = "sys"
	tok, err := uc.Encode(a.sys)
	if err != nil {
		return nil, err
	}
	seed, _ := kp.Seed()
	return jwt.FormatUserConfig(tok, seed)
}

// Push sends the account JWT to the servers of a cluster whose resolver
// is a directory (`resolver: { type: full }`) over a system account
// connection, and waits for want of them to accept it (or for timeout).
// It returns how many did.
func (a *Authority) Push(ctx context.Context, sys *nats.Conn, want int) (int, error) {
	inbox := nats.NewInbox()
	replies := make(chan *nats.Msg, 16)
	sub, err := sys.ChanSubscribe(inbox, replies)
	if err != nil {
		return 0, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := sys.PublishRequest("$SYS.REQ.CLAIMS.UPDATE", inbox, []byte(a.AccountJWT)); err != nil {
		return 0, err
	}
	var errs []string
	ok := 0
	for ok < want {
		select {
		case <-ctx.Done():
			if len(errs) > 0 {
				return ok, fmt.Errorf("auth: pushing the account JWT: %d of %d servers took it: %s", ok, want, strings.Join(errs, "; "))
			}
			return ok, fmt.Errorf("auth: pushing the account JWT: %d of %d servers took it before %w", ok, want, ctx.Err())
		case m := <-replies:
			var r struct {
				Error *struct {
					Description string `json:"description"`
				} `json:"error"`
				Server struct {
					Name string `json:"name"`
				} `json:"server"`
			}
			if json.Unmarshal(m.Data, &r) != nil {
				continue
			}
			if r.Error != nil {
				errs = append(errs, r.Server.Name+": "+r.Error.Description)
				continue
			}
			ok++
		}
	}
	return ok, nil
}

// RevokedKeys lists the revoked keys, sorted (for messages).
func (a *Authority) RevokedKeys() ([]string, error) {
	r, err := a.revocations()
	var out []string
	for k := range r {
		out = append(out, k)
	}
	sort.Strings(out)
	return out, err
}

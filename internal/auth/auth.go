// Package auth is vmherd's trust: who may connect to NATS and what each
// identity may publish and subscribe to. It uses NATS's own decentralized
// authentication (nkeys and JWTs, github.com/nats-io/jwt/v2): an operator
// signs the account vmherd lives in, and the account signs one user JWT
// per identity, with that identity's permissions inside. The server needs
// only the operator and the account JWT; issuing credentials for a new host
// or user is signing a JWT, with no server change.
//
// The keys live in a directory (the engine's <data-dir>/auth, mode 0700,
// files 0600). Roles are in roles.go.
package auth

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"github.com/vmherd/vmherd/internal/credsfile"
	"github.com/vmherd/vmherd/internal/safefile"
	"github.com/vmherd/vmherd/schemas"
)

// The account's limits (Open).
const (
	// MaxConnections bounds the account's client connections: a fleet's
	// workers (one each, up to 10,000 hosts), engines and clients.
	MaxConnections = 16384
	// MaxConsumers bounds the account's JetStream consumers. A stream's
	// own limit cannot exceed it (events.MaxConsumers: VM_TASKS has one
	// consumer per host, up to 10,000); the streams people may create
	// consumers on have their own, lower limit.
	MaxConsumers = 16384
	// MaxPayload is the largest message: a command of schemas.MaxBodySize
	// and the event or record that carries its spec. The embedded server's
	// max_payload is the same.
	MaxPayload = schemas.MaxBodySize + 64<<10
)

// Authority holds the operator, the vmherd account and the system
// account, their keys and JWTs.
type Authority struct {
	Dir                 string
	operator, acct, sys nkeys.KeyPair
	OperatorJWT         string
	AccountJWT          string
	SystemJWT           string
	AccountPub, SysPub  string
}

// Open loads the authority kept in dir, creating it (keys and JWTs) on
// first use. dir and its files are readable by their owner only.
func Open(dir string) (*Authority, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}
	a := &Authority{Dir: dir}
	var err error
	if a.operator, err = loadOrCreate(filepath.Join(dir, "operator.nk"), nkeys.CreateOperator); err != nil {
		return nil, err
	}
	if a.acct, err = loadOrCreate(filepath.Join(dir, "account.nk"), nkeys.CreateAccount); err != nil {
		return nil, err
	}
	if a.sys, err = loadOrCreate(filepath.Join(dir, "system.nk"), nkeys.CreateAccount); err != nil {
		return nil, err
	}
	opPub, _ := a.operator.PublicKey()
	a.AccountPub, _ = a.acct.PublicKey()
	a.SysPub, _ = a.sys.PublicKey()

	oc := jwt.NewOperatorClaims(opPub)
	oc.Name = "vmherd"
	oc.SystemAccount = a.SysPub
	if a.OperatorJWT, err = oc.Encode(a.operator); err != nil {
		return nil, fmt.Errorf("auth: operator jwt: %w", err)
	}
	if err := a.signAccount(); err != nil {
		return nil, err
	}
	sc := jwt.NewAccountClaims(a.SysPub)
	sc.Name = "SYS"
	if a.SystemJWT, err = sc.Encode(a.operator); err != nil {
		return nil, fmt.Errorf("auth: system account jwt: %w", err)
	}
	return a, nil
}

// signAccount signs the vmherd account's JWT, with its limits and the
// revocations kept in the dir (Revoke).
func (a *Authority) signAccount() error {
	ac := jwt.NewAccountClaims(a.AccountPub)
	ac.Name = "VMHERD"
	// Bounds on what any identity can make the servers hold: NATS has no
	// per-user bound on connections or consumers, so these are the
	// account's (streams and storage are vmherd's own, limited by each
	// stream). Payload: the largest command plus room for the event that
	// carries it.
	ac.Limits.Conn = MaxConnections
	ac.Limits.Payload = MaxPayload
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: MaxConsumers, MaxAckPending: -1}
	revoked, err := a.revocations()
	if err != nil {
		return err
	}
	ac.Revocations = revoked
	if a.AccountJWT, err = ac.Encode(a.operator); err != nil {
		return fmt.Errorf("auth: account jwt: %w", err)
	}
	return nil
}

func loadOrCreate(path string, create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, error) {
	if seed, err := os.ReadFile(path); err == nil {
		kp, err := nkeys.FromSeed([]byte(strings.TrimSpace(string(seed))))
		if err != nil {
			return nil, fmt.Errorf("auth: %s: %w", path, err)
		}
		return kp, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("auth: %w", err)
	}
	kp, err := create()
	if err != nil {
		return nil, err
	}
	seed, _ := kp.Seed()
	if err := writeFile(path, append(seed, '\n')); err != nil {
		return nil, err
	}
	return kp, nil
}

// writeFile writes data to path with mode 0600, atomically, through no
// symlink (safefile).
func writeFile(path string, data []byte) error {
	if err := safefile.Write(path, data, 0o600); err != nil {
		return fmt.Errorf("auth: %w", err)
	}
	return nil
}

// Creds returns a credentials file (user JWT and seed) for an identity
// with the given name and permissions, signed by the account.
func (a *Authority) Creds(name string, perms jwt.Permissions) ([]byte, error) {
	return a.creds(name, perms, -1)
}

func (a *Authority) creds(name string, perms jwt.Permissions, subs int64) ([]byte, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	pub, _ := kp.PublicKey()
	uc := jwt.NewUserClaims(pub)
	uc.Name = name
	uc.Permissions = perms
	uc.Limits.Subs = subs
	tok, err := uc.Encode(a.acct)
	if err != nil {
		return nil, fmt.Errorf("auth: user jwt for %s: %w", name, err)
	}
	// Recorded, so that revoking an identity finds every key it was given.
	if err := a.record(name, pub, 0); err != nil {
		return nil, err
	}
	seed, _ := kp.Seed()
	return jwt.FormatUserConfig(tok, seed)
}

// WriteCreds writes the credentials of an identity with a role to path
// (mode 0600), unless the file exists already.
func (a *Authority) WriteCreds(path string, id Identity) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	b, err := a.IdentityCreds(id)
	if err != nil {
		return err
	}
	return writeFile(path, b)
}

// IdentityCreds returns a credentials file for id, with its role's
// permissions.
func (a *Authority) IdentityCreds(id Identity) ([]byte, error) {
	perms, err := id.Permissions()
	if err != nil {
		return nil, err
	}
	return a.creds(id.Name(), perms, id.subs())
}

// ConfigureServer puts an embedded server in operator mode with this
// authority: only clients with credentials it signed may connect.
func (a *Authority) ConfigureServer(o *server.Options) error {
	oc, err := jwt.DecodeOperatorClaims(a.OperatorJWT)
	if err != nil {
		return err
	}
	r := &server.MemAccResolver{}
	if err := r.Store(a.AccountPub, a.AccountJWT); err != nil {
		return err
	}
	if err := r.Store(a.SysPub, a.SystemJWT); err != nil {
		return err
	}
	o.TrustedOperators = []*jwt.OperatorClaims{oc}
	o.AccountResolver = r
	o.SystemAccount = a.SysPub
	return nil
}

// ServerConfig is the nats-server configuration that trusts this
// authority (for a cluster of nats-server processes): include it in each
// node's configuration file. The operator JWT is written next to the keys.
func (a *Authority) ServerConfig() (string, error) {
	// Written once and atomically: servers started earlier may be reading it.
	op := filepath.Join(a.Dir, "operator.jwt")
	if b, err := os.ReadFile(op); err != nil || string(b) != a.OperatorJWT {
		tmp := op + ".tmp"
		if err := os.WriteFile(tmp, []byte(a.OperatorJWT), 0o644); err != nil {
			return "", err
		}
		if err := os.Rename(tmp, op); err != nil {
			return "", err
		}
	}
	return fmt.Sprintf("operator: %q\nsystem_account: %s\nresolver: MEMORY\nresolver_preload: {\n  %s: %q\n  %s: %q\n}\n",
		op, a.SysPub, a.AccountPub, a.AccountJWT, a.SysPub, a.SystemJWT), nil
}

// CredsName returns the identity name in a credentials file's user JWT
// (credsfile.Name).
func CredsName(path string) (string, error) { return credsfile.Name(path) }

// CredsInboxPrefix returns the inbox prefix a credentials file's identity
// must use (credsfile.InboxPrefix).
func CredsInboxPrefix(path string) (string, error) { return credsfile.InboxPrefix(path) }

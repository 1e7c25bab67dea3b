// Package join is how a new host gets its worker credentials: a join
// token that the fleet's authority issues for one host (engine token, or
// engine init), and a request over NATS that the engine holding the
// authority answers.
//
// A token holds the NATS URLs, the fleet's CA certificate and bootstrap
// credentials whose user JWT expires (one hour by default) and may do one
// thing: publish to vmherd.join.<host> and receive the reply. The host
// makes its own user key and sends only the public half; the engine signs
// a worker JWT for it (role worker, that host) and marks the token used.
// So the worker's seed never leaves the host, an expired token is refused
// by the NATS servers themselves, and a token works once.
package join

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"
)

// Subject is where a host's join request goes: SubjectPrefix + host.
const SubjectPrefix = "vmherd.join."

// tokenPrefix starts every token (and says its version).
const tokenPrefix = "vmherd-join-1:"

// DefaultTTL is how long a token lasts unless asked otherwise.
const DefaultTTL = time.Hour

// ErrToken is the category of a token that cannot be used.
var ErrToken = errors.New("join token")

// Token is what a host needs to join.
type Token struct {
	Host    string    `json:"host"`
	URLs    string    `json:"urls"`
	Prefix  string    `json:"prefix"`
	CA      string    `json:"ca"`
	Creds   string    `json:"creds"`
	Expires time.Time `json:"expires"`
}

// Encode writes the token as one line of text.
func (t Token) Encode() string {
	b, _ := json.Marshal(t)
	return tokenPrefix + base64.RawURLEncoding.EncodeToString(b) + "\n"
}

// Decode reads a token, and checks that it has not expired.
func Decode(s string, now time.Time) (Token, error) {
	var t Token
	body, ok := strings.CutPrefix(strings.TrimSpace(s), tokenPrefix)
	if !ok {
		return t, fmt.Errorf("%w: not a vmherd join token (it starts %q)", ErrToken, tokenPrefix)
	}
	b, err := base64.RawURLEncoding.DecodeString(body)
	if err != nil {
		return t, fmt.Errorf("%w: %w", ErrToken, err)
	}
	if err := json.Unmarshal(b, &t); err != nil {
		return t, fmt.Errorf("%w: %w", ErrToken, err)
	}
	if t.Host == "" || t.URLs == "" || t.Creds == "" {
		return t, fmt.Errorf("%w: incomplete", ErrToken)
	}
	if !t.Expires.IsZero() && now.After(t.Expires) {
		return t, fmt.Errorf("%w for host %s expired at %s: issue a new one on the machine with the authority: engine token --host %s",
			ErrToken, t.Host, t.Expires.UTC().Format(time.RFC3339), t.Host)
	}
	return t, nil
}

// BootstrapPermissions are a join token's: ask to join as host, hear the
// answer.
func BootstrapPermissions(host string) jwt.Permissions {
	var p jwt.Permissions
	p.Pub.Allow.Add(SubjectPrefix + host)
	p.Sub.Allow.Add(InboxPrefix(host) + ".>")
	p.Resp = nil
	return p
}

// InboxPrefix is where a joining host hears the answer.
func InboxPrefix(host string) string { return "_INBOX_VMHERD.join." + host }

// ServicePermissions are the join service's: hear join requests, answer.
func ServicePermissions() jwt.Permissions {
	var p jwt.Permissions
	p.Sub.Allow.Add(SubjectPrefix + "*")
	p.Pub.Allow.Add("_INBOX_VMHERD.join.>")
	return p
}

// Request is a host's join request.
type Request struct {
	// Bootstrap is the token's user JWT (which token is being used).
	Bootstrap string `json:"bootstrap"`
	// Pub is the public key the host made for its worker.
	Pub string `json:"pub"`
}

// Reply is the service's answer.
type Reply struct {
	JWT    string    `json:"jwt,omitempty"`
	Host   string    `json:"host,omitempty"`
	URLs   string    `json:"urls,omitempty"`
	Prefix string    `json:"prefix,omitempty"`
	CA     string    `json:"ca,omitempty"`
	Time   time.Time `json:"time"`
	Error  string    `json:"error,omitempty"`
}

// tlsConfig verifies servers with the token's CA only.
func tlsConfig(caPEM string) (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(caPEM)) {
		return nil, fmt.Errorf("%w: its CA certificate does not parse", ErrToken)
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

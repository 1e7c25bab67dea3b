// Package credsfile reads what a client needs from a NATS credentials
// file: the identity's name and its inbox prefix. It is apart from
// package auth (the authority, which links the NATS server) so that vmctl,
// started thousands of times by a CI system, does not load the server.
package credsfile

import (
	"fmt"
	"os"
	"strings"

	"github.com/nats-io/jwt/v2"
)

// claims reads the user JWT of a credentials file.
func claims(path string) (*jwt.UserClaims, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	tok, err := jwt.ParseDecoratedJWT(b)
	if err != nil {
		return nil, fmt.Errorf("auth: %s: %w", path, err)
	}
	uc, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		return nil, fmt.Errorf("auth: %s: %w", path, err)
	}
	return uc, nil
}

// Name returns the identity name in a credentials file's user JWT: the
// issuer token its holder puts on commands.
func Name(path string) (string, error) {
	uc, err := claims(path)
	if err != nil {
		return "", err
	}
	return uc.Name, nil
}

// InboxPrefix returns the inbox prefix a credentials file's identity must
// use: the one its subscribe permissions allow (auth.Identity.InboxPrefix;
// a worker's credentials from before it, _INBOX_<host>), or "" for NATS's
// default (credentials that may subscribe to _INBOX.>).
func InboxPrefix(path string) (string, error) {
	uc, err := claims(path)
	if err != nil {
		return "", err
	}
	for _, s := range uc.Sub.Allow {
		if p, ok := strings.CutSuffix(s, ".>"); ok && strings.HasPrefix(p, "_INBOX") && p != "_INBOX" && !strings.ContainsAny(p, "*>") {
			return p, nil
		}
	}
	return "", nil
}

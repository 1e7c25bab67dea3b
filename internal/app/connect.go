package app

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/config"
	"github.com/vmherd/vmherd/internal/credsfile"
)

// ErrWillNotHeal is the category of a start-up failure that waiting
// cannot mend: credentials the servers refuse (missing, wrong, expired,
// revoked), a server certificate that does not verify, a bad
// configuration. A daemon stops at once with one line naming it, and
// exits with ExitWillNotHeal (the systemd units do not restart on it).
var ErrWillNotHeal = errors.New("this will not heal by waiting: not retried")

// ExitWillNotHeal is the exit code of a daemon stopped by ErrWillNotHeal
// or a bad configuration file (78, EX_CONFIG of sysexits.h).
const ExitWillNotHeal = 78

// exitCode maps a daemon's error to its exit code.
func exitCode(err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrWillNotHeal), errors.Is(err, config.ErrInvalid):
		return ExitWillNotHeal
	}
	return 1
}

// permanent reports a connection error that retrying will not mend.
func permanent(err error) bool {
	var (
		unknownCA *x509.UnknownAuthorityError
		hostname  x509.HostnameError
		invalid   x509.CertificateInvalidError
		verify    *tls.CertificateVerificationError
		alert     tls.AlertError
	)
	switch {
	case errors.Is(err, nats.ErrAuthorization), errors.Is(err, nats.ErrAuthExpired),
		errors.Is(err, nats.ErrAuthRevoked), errors.Is(err, nats.ErrAccountAuthExpired),
		errors.Is(err, nats.ErrSecureConnRequired), errors.Is(err, nats.ErrSecureConnWanted),
		errors.As(err, &unknownCA), errors.As(err, &hostname), errors.As(err, &invalid),
		errors.As(err, &verify), errors.As(err, &alert):
		return true
	}
	// The server's -ERR text, when a path hands it on unparsed.
	return err != nil && strings.Contains(strings.ToLower(err.Error()), "authorization violation")
}

// why explains a permanent error: what it means and what to do.
func (o *ConnOptions) why(err error) string {
	creds := "no credentials were given (set creds in the config file, --creds or VMHERD_CREDS)"
	if o.Creds != "" {
		creds = "they refused the credentials in " + o.Creds + " (not signed by this fleet's authority, or revoked: get new ones with `worker join` or `engine creds`)"
	}
	switch {
	case errors.Is(err, nats.ErrAuthRevoked):
		return "the credentials in " + o.Creds + " were revoked (get new ones: docs/deploy.md, rotating a host's credentials)"
	case errors.Is(err, nats.ErrAuthExpired), errors.Is(err, nats.ErrAccountAuthExpired):
		return "the credentials in " + o.Creds + " expired"
	case errors.Is(err, nats.ErrAuthorization), permanent(err) && strings.Contains(strings.ToLower(err.Error()), "authorization violation"):
		return creds
	case errors.Is(err, nats.ErrSecureConnRequired):
		return "the servers require TLS: give the fleet's CA (tls-ca)"
	case errors.Is(err, nats.ErrSecureConnWanted):
		return "tls-ca is set but the servers do not speak TLS"
	}
	return "TLS: the server's certificate does not verify against " + orNone(o.TLSCA) + " (give the fleet's ca.pem as tls-ca; the URL's host must be a name or address in the certificate)"
}

func orNone(s string) string {
	if s == "" {
		return "the system's CAs (no tls-ca given)"
	}
	return s
}

// checkCreds reads the credentials file before any connection, so that
// a missing, unreadable or expired file is named at once.
func checkCreds(path string) error {
	if path == "" {
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("credentials: %w (%w)", err, ErrWillNotHeal)
	}
	if err := checkRootFile(path); err != nil {
		return fmt.Errorf("credentials: %w (%w)", err, ErrWillNotHeal)
	}
	tok, err := jwt.ParseDecoratedJWT(b)
	if err != nil {
		return fmt.Errorf("credentials %s: %w (%w)", path, err, ErrWillNotHeal)
	}
	uc, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		return fmt.Errorf("credentials %s: not a NATS user JWT: %w (%w)", path, err, ErrWillNotHeal)
	}
	if uc.Expires > 0 && time.Unix(uc.Expires, 0).Before(time.Now()) {
		return fmt.Errorf("credentials %s (%s) expired at %s: get new ones, docs/deploy.md (%w)",
			path, uc.Name, time.Unix(uc.Expires, 0).UTC().Format(time.RFC3339), ErrWillNotHeal)
	}
	return nil
}

// DialDaemon connects a daemon to NATS. What may heal (no server answers
// yet, a node down, a name that does not resolve yet) it waits out,
// logging "waiting for NATS"; what will not (credentials refused or
// expired, a certificate that does not verify) it returns at once as
// ErrWillNotHeal. Once connected it reconnects for ever, and if the
// servers later close the connection for good (credentials revoked or
// expired while connected), it calls onFatal with the reason.
func (o *ConnOptions) DialDaemon(ctx context.Context, log *slog.Logger, onFatal func(error)) (*nats.Conn, jetstream.JetStream, error) {
	if err := checkCreds(o.Creds); err != nil {
		return nil, nil, err
	}
	opts, err := o.options()
	if err != nil {
		return nil, nil, fmt.Errorf("%w (%w)", err, ErrWillNotHeal)
	}
	// The first auth error the servers sent while connected (revoked,
	// expired) names the cause better than the last (authorization
	// violation, on the reconnect that follows).
	var mu sync.Mutex
	var cause error
	opts = append(opts, nats.MaxReconnects(-1), nats.ReconnectWait(250*time.Millisecond),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			if permanent(err) {
				mu.Lock()
				if cause == nil {
					cause = err
				}
				mu.Unlock()
			}
			// What nats.go's default handler would print (permission
			// violations, slow consumers), in the daemon's log.
			if sub != nil {
				log.Warn("NATS reported an error", "err", err, "subscription", sub.Subject)
			} else {
				log.Warn("NATS reported an error", "err", err)
			}
		}),
		nats.ClosedHandler(func(nc *nats.Conn) {
			err := nc.LastError()
			mu.Lock()
			if cause != nil {
				err = cause
			}
			mu.Unlock()
			if permanent(err) && onFatal != nil {
				onFatal(fmt.Errorf("NATS closed the connection for good: %s: %w (%w)", o.why(err), err, ErrWillNotHeal))
			}
		}))
	wait := 250 * time.Millisecond
	start := time.Now()
	for attempt := 1; ; attempt++ {
		nc, err := nats.Connect(o.URL, opts...)
		if err == nil {
			if attempt > 1 {
				log.Info("connected to NATS after waiting", "url", o.URL, "waited", time.Since(start).Round(time.Millisecond))
			}
			js, err := jetstream.New(nc)
			if err != nil {
				nc.Close()
				return nil, nil, err
			}
			return nc, js, nil
		}
		if permanent(err) {
			return nil, nil, fmt.Errorf("connecting to NATS at %s: %s: %w (%w)", o.URL, o.why(err), err, ErrWillNotHeal)
		}
		log.Warn("waiting for NATS", "url", o.URL, "attempt", attempt, "since", time.Since(start).Round(time.Second), "retry_in", wait, "err", err)
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(wait + rand.N(wait/2)):
		}
		// At most 2 s: a server that comes back is found about as soon as
		// nats.go's own reconnects would.
		wait = min(2*wait, 2*time.Second)
	}
}

// credsForHost refuses another host's worker credentials: their
// permissions would refuse every subject of this host, and the worker
// would wait for ever for what it may not see.
func credsForHost(path, host string) error {
	if path == "" {
		return nil
	}
	name, err := credsfile.Name(path)
	if err != nil {
		return fmt.Errorf("credentials: %w (%w)", err, ErrWillNotHeal)
	}
	want := auth.Identity{Role: auth.RoleWorker, Host: host}.Name()
	if strings.HasPrefix(name, "worker-") && name != want {
		return fmt.Errorf("credentials %s are %s's, but this worker's host is %s: give the host's own (or set host to match) (%w)", path, name, host, ErrWillNotHeal)
	}
	return nil
}

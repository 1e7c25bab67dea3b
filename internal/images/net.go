package images

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/klauspost/compress/zstd"
)

// Policy bounds what a pull may reach and take: the worker's --image-*
// flags (docs/trust.md, Image pulls).
type Policy struct {
	// AllowPrivate lets pulls reach loopback, private, link-local (cloud
	// metadata), shared and other non-public addresses.
	AllowPrivate bool
	// AllowHTTPRegistry lets oci:// pulls speak plain HTTP to a registry
	// (go-containerregistry falls back to it for localhost and private
	// registries).
	AllowHTTPRegistry bool
	// MaxSize bounds an image's stored (decompressed) bytes and its
	// download (default DefaultMaxSize).
	MaxSize int64
	// Timeout bounds a whole pull (default DefaultPullTimeout).
	Timeout time.Duration
	// QEMUImg describes what was pulled (package imagechain); "" looks
	// for qemu-img on PATH, and without it only the headers are read.
	QEMUImg string

	// allowed are addresses let through whatever they are (tests: one
	// loopback server allowed, the redirect it sends refused).
	allowed []netip.AddrPort
}

// Defaults of Policy.
const (
	DefaultMaxSize     int64 = 64 << 30
	DefaultPullTimeout       = 2 * time.Hour
	// zstdMaxWindow bounds a zstd stream's window (its decoder's memory):
	// the zstd tool's own default limit.
	zstdMaxWindow = 128 << 20
)

func (p Policy) maxSize() int64 {
	if p.MaxSize > 0 {
		return p.MaxSize
	}
	return DefaultMaxSize
}

func (p Policy) timeout() time.Duration {
	if p.Timeout > 0 {
		return p.Timeout
	}
	return DefaultPullTimeout
}

// Failure kinds of a pull; the message names what happened without any
// text the remote side chose.
var (
	// ErrDestination: the pull would reach an address it may not.
	ErrDestination = errors.New("destination refused")
	// ErrTooLarge: the image is over Policy.MaxSize.
	ErrTooLarge = errors.New("image too large")
	// ErrRemote: the server or registry failed or answered something
	// unusable.
	ErrRemote = errors.New("download failed")
)

// metadataAddrs are cloud instance metadata services.
var metadataAddrs = map[netip.Addr]bool{
	netip.MustParseAddr("169.254.169.254"): true, // AWS, GCP, Azure, OpenStack, ...
	netip.MustParseAddr("169.254.170.2"):   true, // AWS ECS task metadata
	netip.MustParseAddr("100.100.100.200"): true, // Alibaba Cloud
	netip.MustParseAddr("fd00:ec2::254"):   true, // AWS over IPv6
}

var (
	sharedNet = netip.MustParsePrefix("100.64.0.0/10") // carrier-grade NAT
	thisNet   = netip.MustParsePrefix("0.0.0.0/8")
)

// nonPublic says why a pull may not reach ip ("" when it may).
func nonPublic(ip netip.Addr) string {
	ip = ip.Unmap()
	switch {
	case metadataAddrs[ip]:
		return "a cloud metadata address"
	case ip.IsLoopback():
		return "a loopback address"
	case ip.IsLinkLocalUnicast():
		return "a link-local address"
	case ip.IsPrivate():
		return "a private address"
	case sharedNet.Contains(ip):
		return "a shared (carrier-grade NAT) address"
	case ip.IsUnspecified() || thisNet.Contains(ip):
		return "an unspecified address"
	case ip.IsMulticast() || ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "not a unicast address"
	}
	return ""
}

// destinationError is a connection the policy refused.
type destinationError struct{ ip, why string }

func (e *destinationError) Error() string {
	return fmt.Sprintf("%v: %s is %s; this worker pulls only from public addresses (start it with --image-allow-private to allow it)", ErrDestination, e.ip, e.why)
}

func (e *destinationError) Is(target error) bool { return target == ErrDestination }

// control checks each connection's address as it is dialled, after name
// resolution and for every redirect, so a name that resolves differently
// the second time (DNS rebinding) is caught too.
func (p Policy) control(_, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return &destinationError{ip: address, why: "not an address"}
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return &destinationError{ip: host, why: "not an IP address"}
	}
	if ap, err := netip.ParseAddrPort(address); err == nil && slices.Contains(p.allowed, ap) {
		return nil
	}
	if why := nonPublic(ip); why != "" && !p.AllowPrivate {
		return &destinationError{ip: ip.Unmap().String(), why: why}
	}
	return nil
}

// plainHTTPError is a plain-HTTP request to a registry the policy refused.
type plainHTTPError struct{}

func (plainHTTPError) Error() string {
	return fmt.Sprintf("%v: the registry would be reached over plain HTTP (start the worker with --image-allow-http-registry to allow it)", ErrDestination)
}

func (plainHTTPError) Is(target error) bool { return target == ErrDestination }

type refuseHTTP struct{ next http.RoundTripper }

func (r refuseHTTP) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "https" {
		return nil, plainHTTPError{}
	}
	return r.next.RoundTrip(req)
}

// transport is the HTTP transport of every pull: no proxy from the
// environment (the destination is what is checked), each dial checked.
func (p Policy) transport() *http.Transport {
	d := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second, Control: p.control}
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           d.DialContext,
		ForceAttemptHTTP2:     true,
		TLSHandshakeTimeout:   30 * time.Second,
		ResponseHeaderTimeout: time.Minute,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConns:          4,
	}
}

// registryTransport is the transport of oci:// pulls.
func (p Policy) registryTransport() http.RoundTripper {
	if p.AllowHTTPRegistry {
		return p.transport()
	}
	return refuseHTTP{p.transport()}
}

// localError is a failure on this host (writing the image), told as is.
type localError struct{ err error }

func (e localError) Error() string { return e.err.Error() }
func (e localError) Unwrap() error { return e.err }

// localWriter marks its writer's errors as this host's.
type localWriter struct{ w io.Writer }

func (l localWriter) Write(b []byte) (int, error) {
	n, err := l.w.Write(b)
	if err != nil && !errors.Is(err, ErrTooLarge) {
		err = localError{err}
	}
	return n, err
}

// statusError is an HTTP answer other than 200.
type statusError struct{ code int }

func (e statusError) Error() string {
	return fmt.Sprintf("%v: the server answered HTTP %d %s", ErrRemote, e.code, http.StatusText(e.code))
}
func (e statusError) Is(target error) bool { return target == ErrRemote }

var hostName = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z0-9.-]{1,253}$`) }) // compiled on first use, as mediaTypeSyntax

// describe names a pull's failure without the remote side's words: a
// server's banner, body, status text or a registry's error messages never
// reach an event or an error.
func describe(err error, p Policy) error {
	var (
		dest   *destinationError
		plain  plainHTTPError
		local  localError
		status statusError
		terr   *transport.Error
		dns    *net.DNSError
		unauth x509.UnknownAuthorityError
		hostn  x509.HostnameError
		certv  *tls.CertificateVerificationError
		rec    tls.RecordHeaderError
	)
	switch {
	case err == nil:
		return nil
	case errors.As(err, &dest):
		return dest
	case errors.As(err, &plain):
		return plain
	case errors.Is(err, ErrTooLarge), errors.As(err, &local), errors.As(err, &status):
		return err
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("%w: timed out (a pull may take %s: --image-pull-timeout)", ErrRemote, p.timeout())
	case errors.Is(err, context.Canceled):
		return fmt.Errorf("%w: cancelled (the worker is stopping)", ErrRemote)
	case errors.As(err, &terr):
		return fmt.Errorf("%w: the registry answered HTTP %d %s", ErrRemote, terr.StatusCode, http.StatusText(terr.StatusCode))
	case errors.As(err, &dns):
		if hostName().MatchString(dns.Name) {
			return fmt.Errorf("%w: the host name %s does not resolve", ErrRemote, dns.Name)
		}
		return fmt.Errorf("%w: a host name does not resolve", ErrRemote)
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("%w: the connection was refused", ErrRemote)
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return fmt.Errorf("%w: the server closed the connection early", ErrRemote)
	case errors.As(err, &unauth), errors.As(err, &hostn), errors.As(err, &certv):
		return fmt.Errorf("%w: the server's TLS certificate is not valid for it", ErrRemote)
	case errors.As(err, &rec):
		return fmt.Errorf("%w: the server does not speak TLS", ErrRemote)
	case errors.Is(err, zstd.ErrWindowSizeExceeded):
		return fmt.Errorf("%w: the zstd stream needs a window over %d MiB", ErrRemote, zstdMaxWindow>>20)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%w: timed out", ErrRemote)
	}
	return fmt.Errorf("%w: the server's answer is not a usable HTTP or registry response", ErrRemote)
}

// capWriter fails a write past max bytes with ErrTooLarge.
type capWriter struct {
	w   io.Writer
	n   int64
	max int64
}

func (c *capWriter) Write(b []byte) (int, error) {
	if c.n+int64(len(b)) > c.max {
		return 0, tooLarge(c.max)
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}

func tooLarge(max int64) error {
	return fmt.Errorf("%w: it is larger than %d bytes (%d MiB; --image-max-size)", ErrTooLarge, max, max>>20)
}

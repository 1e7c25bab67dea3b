package images

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/klauspost/compress/zstd"
)

// zstdMagic starts every zstd frame.
var zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}

type httpFetcher struct {
	url string
	p   Policy
}

// fetch streams the URL to w: a status other than 200 is an error, a
// zstd stream (by its magic bytes) is decompressed, and a body shorter
// than the length the server announced is an error. Every connection,
// redirects too, is checked against the policy as it is dialled, and
// what arrives is capped at the policy's size.
func (f httpFetcher) fetch(ctx context.Context, w io.Writer, o PullOptions) (fetched, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.url, nil)
	if err != nil {
		return fetched{}, err
	}
	var redirectErr error
	client := &http.Client{Transport: f.p.transport(), CheckRedirect: func(req *http.Request, via []*http.Request) error {
		switch {
		case len(via) >= 10:
			redirectErr = fmt.Errorf("%w: more than 10 redirects", ErrRemote)
		case req.URL.Scheme != "http" && req.URL.Scheme != "https":
			redirectErr = fmt.Errorf("%w: a redirect to a scheme other than http(s)", ErrRemote)
		}
		return redirectErr
	}}
	resp, err := client.Do(req)
	if redirectErr != nil {
		return fetched{}, redirectErr
	}
	if err != nil {
		return fetched{}, describe(err, f.p)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fetched{}, statusError{resp.StatusCode}
	}
	max := f.p.maxSize()
	if resp.ContentLength > max {
		return fetched{}, tooLarge(max)
	}
	raw := sha256.New()
	p := &progress{w: io.Discard, total: resp.ContentLength, fn: o.Progress}
	counted := &countingReader{r: io.TeeReader(resp.Body, io.MultiWriter(raw, p)), max: max}
	br := bufio.NewReaderSize(counted, 64<<10)
	var r io.Reader = br
	if magic, _ := br.Peek(len(zstdMagic)); bytes.Equal(magic, zstdMagic) {
		dec, err := zstd.NewReader(br, zstd.WithDecoderMaxWindow(zstdMaxWindow), zstd.WithDecoderConcurrency(1))
		if err != nil {
			return fetched{}, err
		}
		defer dec.Close()
		r = dec
	}
	if _, err := io.Copy(&capWriter{w: localWriter{w}, max: max}, r); err != nil {
		return fetched{}, describe(err, f.p)
	}
	// The rest of the body (after a zstd stream's end), so the checksum
	// and the length are of all of it.
	if _, err := io.Copy(io.Discard, br); err != nil {
		return fetched{}, describe(err, f.p)
	}
	p.done()
	if resp.ContentLength >= 0 && counted.n != resp.ContentLength {
		return fetched{}, fmt.Errorf("%w: the download is truncated: %d of %d bytes", ErrRemote, counted.n, resp.ContentLength)
	}
	return fetched{sourceDigest: digestOf(raw), mediaType: mediaType(resp.Header.Get("Content-Type"))}, nil
}

// countingReader counts what it reads, failing past max bytes.
type countingReader struct {
	r   io.Reader
	n   int64
	max int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if c.n > c.max {
		return n, tooLarge(c.max)
	}
	return n, err
}

// mediaTypeSyntax is what a media type may look like (RFC 6838 names and
// simple parameters); anything else a server sends is not repeated.
// It is compiled on first use: its counted repetitions make a large
// program, which every process importing this package (vmctl) would
// otherwise build at start-up.
var mediaTypeSyntax = sync.OnceValue(func() *regexp.Regexp {
	return regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}(; ?[A-Za-z0-9_.-]{1,64}=[A-Za-z0-9_.-]{1,64})?$`)
})

// mediaType is a remote media type if it looks like one, else "".
func mediaType(s string) string {
	if mediaTypeSyntax().MatchString(s) {
		return s
	}
	return ""
}

// LayerMediaTypes are the OCI layer media types taken as disk images (the
// CloudNebula qcow2 layer, and plain bytes).
var LayerMediaTypes = []string{"application/vnd.cloudnebula.qcow2.layer.v1", "application/octet-stream"}

type ociFetcher struct {
	ref string
	p   Policy
}

// layer resolves the reference to the image's disk layer.
func (f ociFetcher) layer(ctx context.Context) (v1.Image, v1.Descriptor, error) {
	ref, err := name.ParseReference(f.ref)
	if err != nil {
		return nil, v1.Descriptor{}, fmt.Errorf("oci reference %q: %w", f.ref, err)
	}
	desc, err := remote.Get(ref, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain),
		remote.WithTransport(f.p.registryTransport()))
	if err != nil {
		return nil, v1.Descriptor{}, describe(err, f.p)
	}
	img, err := desc.Image()
	if err != nil {
		return nil, v1.Descriptor{}, describe(err, f.p)
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, v1.Descriptor{}, describe(err, f.p)
	}
	var seen []string
	for _, l := range m.Layers {
		if slices.Contains(LayerMediaTypes, string(l.MediaType)) {
			return img, l, nil
		}
		if t := mediaType(string(l.MediaType)); t != "" {
			seen = append(seen, t)
		} else {
			seen = append(seen, "(a media type not repeated here)")
		}
	}
	return nil, v1.Descriptor{}, fmt.Errorf("%s has no disk image layer (media type %s); its layers are: %s",
		f.ref, strings.Join(LayerMediaTypes, " or "), strings.Join(seen, ", "))
}

// resolve is the layer's digest, known before fetching it.
func (f ociFetcher) resolve(ctx context.Context) (string, error) {
	_, l, err := f.layer(ctx)
	if err != nil {
		return "", err
	}
	return l.Digest.String(), nil
}

// fetch streams the disk layer to w and checks its digest and size.
func (f ociFetcher) fetch(ctx context.Context, w io.Writer, o PullOptions) (fetched, error) {
	img, l, err := f.layer(ctx)
	if err != nil {
		return fetched{}, err
	}
	if max := f.p.maxSize(); l.Size > max {
		return fetched{}, tooLarge(max)
	}
	layer, err := img.LayerByDigest(l.Digest)
	if err != nil {
		return fetched{}, describe(err, f.p)
	}
	rc, err := layer.Compressed()
	if err != nil {
		return fetched{}, describe(err, f.p)
	}
	defer rc.Close()
	h := sha256.New()
	p := &progress{w: io.MultiWriter(localWriter{w}, h), total: l.Size, fn: o.Progress}
	n, err := io.Copy(&capWriter{w: p, max: f.p.maxSize()}, rc)
	if err != nil {
		return fetched{}, fmt.Errorf("downloading layer %s: %w", l.Digest, describe(err, f.p))
	}
	p.done()
	if got := digestOf(h); got != l.Digest.String() || n != l.Size {
		return fetched{}, fmt.Errorf("layer %s arrived as %d bytes with digest %s (want %d bytes)", l.Digest, n, got, l.Size)
	}
	return fetched{sourceDigest: l.Digest.String(), mediaType: string(l.MediaType)}, nil
}

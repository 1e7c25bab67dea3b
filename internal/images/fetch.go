package images

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/klauspost/compress/zstd"
)

// zstdMagic starts every zstd frame.
var zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}

type httpFetcher struct{ url string }

// fetch streams the URL to w: a status other than 200 is an error, a
// zstd stream (by its magic bytes) is decompressed, and a body shorter
// than the length the server announced is an error.
func (f httpFetcher) fetch(ctx context.Context, w io.Writer, o PullOptions) (fetched, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.url, nil)
	if err != nil {
		return fetched{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fetched{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fetched{}, fmt.Errorf("the server answered %s", resp.Status)
	}
	raw := sha256.New()
	p := &progress{w: io.Discard, total: resp.ContentLength, fn: o.Progress}
	counted := &countingReader{r: io.TeeReader(resp.Body, io.MultiWriter(raw, p))}
	br := bufio.NewReaderSize(counted, 64<<10)
	var r io.Reader = br
	if magic, _ := br.Peek(len(zstdMagic)); bytes.Equal(magic, zstdMagic) {
		dec, err := zstd.NewReader(br)
		if err != nil {
			return fetched{}, err
		}
		defer dec.Close()
		r = dec
	}
	if _, err := io.Copy(w, r); err != nil {
		return fetched{}, fmt.Errorf("downloading: %w", err)
	}
	// The rest of the body (after a zstd stream's end), so the checksum
	// and the length are of all of it.
	if _, err := io.Copy(io.Discard, br); err != nil {
		return fetched{}, fmt.Errorf("downloading: %w", err)
	}
	p.done()
	if resp.ContentLength >= 0 && counted.n != resp.ContentLength {
		return fetched{}, fmt.Errorf("the download is truncated: %d of %d bytes", counted.n, resp.ContentLength)
	}
	return fetched{sourceDigest: digestOf(raw), mediaType: resp.Header.Get("Content-Type")}, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// LayerMediaTypes are the OCI layer media types taken as disk images (the
// CloudNebula qcow2 layer, and plain bytes).
var LayerMediaTypes = []string{"application/vnd.cloudnebula.qcow2.layer.v1", "application/octet-stream"}

type ociFetcher struct{ ref string }

// layer resolves the reference to the image's disk layer.
func (f ociFetcher) layer(ctx context.Context) (v1.Image, v1.Descriptor, error) {
	ref, err := name.ParseReference(f.ref)
	if err != nil {
		return nil, v1.Descriptor{}, fmt.Errorf("oci reference %q: %w", f.ref, err)
	}
	desc, err := remote.Get(ref, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain))
	if err != nil {
		return nil, v1.Descriptor{}, err
	}
	img, err := desc.Image()
	if err != nil {
		return nil, v1.Descriptor{}, err
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, v1.Descriptor{}, err
	}
	var seen []string
	for _, l := range m.Layers {
		if slices.Contains(LayerMediaTypes, string(l.MediaType)) {
			return img, l, nil
		}
		seen = append(seen, string(l.MediaType))
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
	layer, err := img.LayerByDigest(l.Digest)
	if err != nil {
		return fetched{}, err
	}
	rc, err := layer.Compressed()
	if err != nil {
		return fetched{}, err
	}
	defer rc.Close()
	h := sha256.New()
	p := &progress{w: io.MultiWriter(w, h), total: l.Size, fn: o.Progress}
	n, err := io.Copy(p, rc)
	if err != nil {
		return fetched{}, fmt.Errorf("downloading layer %s: %w", l.Digest, err)
	}
	p.done()
	if got := digestOf(h); got != l.Digest.String() || n != l.Size {
		return fetched{}, fmt.Errorf("layer %s arrived as %d bytes with digest %s (want %d bytes)", l.Digest, n, got, l.Size)
	}
	return fetched{sourceDigest: l.Digest.String(), mediaType: string(l.MediaType)}, nil
}

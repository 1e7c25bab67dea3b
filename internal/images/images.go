// Package images is a worker's image store: disk images pulled from
// http(s) URLs or OCI registries, kept by the sha256 of their content and
// named, under one root (the worker's default image root,
// <data-dir>/images).
//
// Layout:
//
//	<root>/blobs/sha256/<hex>   the images, read-only, by content digest
//	<root>/refs/<name>.json     a name: its Image record
//	<root>/.partial/            downloads in progress; never an image
//
// A pull streams to a file under .partial, checks what it can (the HTTP
// status, the length the server announced, the sha256 asked for, the OCI
// digest), and only then renames the file into blobs: a failed, partial
// or wrong download is never an image.
package images

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/imagechain"
)

// Image is one named image in a store.
type Image struct {
	Name string `json:"name"`
	// Digest is sha256:<hex> of the image file as stored (decompressed).
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
	// Source is where it was pulled from (an http(s) URL or oci://ref).
	Source string `json:"source"`
	// SourceDigest is sha256:<hex> of the bytes as served (HTTP: before
	// decompression; OCI: the layer's digest).
	SourceDigest string `json:"source_digest"`
	// MediaType: the OCI layer's media type, or the HTTP Content-Type.
	MediaType string    `json:"media_type,omitempty"`
	Path      string    `json:"path"`
	Pulled    time.Time `json:"pulled"`
}

// Store is an image store rooted at Root.
type Store struct {
	Root string
	// Policy bounds pulls: destinations, size, time.
	Policy Policy
}

// ErrNotFound: no image by that name.
var ErrNotFound = errors.New("no such image")

// PullOptions shape a pull.
type PullOptions struct {
	// Name of the image (default: from the source, e.g. debian-12 for
	// .../debian-12.qcow2.zst or repo:tag's repo).
	Name string
	// SHA256 (hex, optional) the bytes as served must have.
	SHA256 string
	// Progress, if set, is called as bytes arrive (total -1: unknown).
	Progress func(done, total int64)
}

// Progress reports at most this often.
const progressEvery = 250 * time.Millisecond

func (s *Store) blobs() string   { return filepath.Join(s.Root, "blobs", "sha256") }
func (s *Store) refs() string    { return filepath.Join(s.Root, "refs") }
func (s *Store) partial() string { return filepath.Join(s.Root, ".partial") }

// Pull fetches source into the store under a name and returns its record.
// A source whose bytes are already stored (same sha256 asked for, same OCI
// digest) is not fetched again.
func (s *Store) Pull(ctx context.Context, source string, o PullOptions) (Image, error) {
	name := o.Name
	if name == "" {
		name = api.ImageNameFrom(source)
	}
	if err := api.ValidateName(name); err != nil {
		return Image{}, fmt.Errorf("image name: %w (give one with --name)", err)
	}
	if o.SHA256 != "" {
		o.SHA256 = strings.TrimPrefix(strings.ToLower(o.SHA256), "sha256:")
		if b, err := hex.DecodeString(o.SHA256); err != nil || len(b) != sha256.Size {
			return Image{}, fmt.Errorf("--sha256 %q: want 64 hex digits", o.SHA256)
		}
	}
	// The store is the worker's: images and records readable by it only.
	for _, d := range []string{s.Root, filepath.Dir(s.blobs()), s.blobs(), s.refs(), s.partial()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return Image{}, err
		}
		if err := os.Chmod(d, 0o700); err != nil {
			return Image{}, err
		}
	}
	ctx, cancel := context.WithTimeout(ctx, s.Policy.timeout())
	defer cancel()
	var fetch fetcher
	switch {
	case strings.HasPrefix(source, "http://"), strings.HasPrefix(source, "https://"):
		fetch = httpFetcher{url: source, p: s.Policy}
	case strings.HasPrefix(source, "oci://"):
		fetch = ociFetcher{ref: strings.TrimPrefix(source, "oci://"), p: s.Policy}
	default:
		return Image{}, fmt.Errorf("image source %q: want http(s)://… or oci://registry/repo:tag|@digest", source)
	}
	// Idempotent by content: the same bytes asked for again are not
	// fetched again.
	want := ""
	if o.SHA256 != "" {
		want = "sha256:" + o.SHA256
	} else if r, ok := fetch.(interface {
		resolve(context.Context) (string, error)
	}); ok {
		d, err := r.resolve(ctx)
		if err != nil {
			return Image{}, fmt.Errorf("pulling %s: %w (nothing was stored)", source, err)
		}
		want = d
	}
	if want != "" {
		if have, ok := s.bySourceDigest(want); ok {
			have.Name, have.Source, have.Pulled = name, source, time.Now().UTC()
			return have, s.writeRef(have)
		}
	}
	tmp, err := os.CreateTemp(s.partial(), "pull-*")
	if err != nil {
		return Image{}, err
	}
	defer os.Remove(tmp.Name()) // after the rename, nothing
	defer tmp.Close()
	content := sha256.New()
	got, err := fetch.fetch(ctx, io.MultiWriter(tmp, content), o)
	if err != nil {
		return Image{}, fmt.Errorf("pulling %s: %w (nothing was stored)", source, err)
	}
	if o.SHA256 != "" && got.sourceDigest != "sha256:"+o.SHA256 {
		return Image{}, fmt.Errorf("pulling %s: the download's sha256 is %s, not the %s asked for (nothing was stored)",
			source, strings.TrimPrefix(got.sourceDigest, "sha256:"), o.SHA256)
	}
	if err := tmp.Sync(); err != nil {
		return Image{}, err
	}
	st, err := tmp.Stat()
	if err != nil {
		return Image{}, err
	}
	if err := tmp.Close(); err != nil {
		return Image{}, err
	}
	// What arrived must be a disk image that names no other file: a
	// backing file, vmdk extent or data file would be a path on this host
	// (docs/trust.md).
	if _, err := s.Policy.chain().Inspect(ctx, tmp.Name(), ""); err != nil {
		return Image{}, fmt.Errorf("pulling %s: %w (nothing was stored)", source, err)
	}
	hexd := hex.EncodeToString(content.Sum(nil))
	blob := filepath.Join(s.blobs(), hexd)
	if _, err := os.Stat(blob); errors.Is(err, fs.ErrNotExist) {
		if err := os.Chmod(tmp.Name(), 0o400); err != nil {
			return Image{}, err
		}
		if err := os.Rename(tmp.Name(), blob); err != nil {
			return Image{}, err
		}
	}
	img := Image{
		Name: name, Digest: "sha256:" + hexd, Size: st.Size(), Source: source, SourceDigest: got.sourceDigest,
		MediaType: got.mediaType, Path: blob, Pulled: time.Now().UTC(),
	}
	return img, s.writeRef(img)
}

// fetched is what a fetcher learned.
type fetched struct {
	sourceDigest string
	mediaType    string
}

type fetcher interface {
	fetch(ctx context.Context, w io.Writer, o PullOptions) (fetched, error)
}

func (s *Store) writeRef(img Image) error {
	b, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(s.partial(), "ref-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), filepath.Join(s.refs(), img.Name+".json"))
}

// Get returns the image named name.
func (s *Store) Get(name string) (Image, error) {
	if api.ValidateName(name) != nil {
		return Image{}, fmt.Errorf("image %q: %w", name, ErrNotFound)
	}
	b, err := os.ReadFile(filepath.Join(s.refs(), name+".json"))
	if errors.Is(err, fs.ErrNotExist) {
		return Image{}, fmt.Errorf("image %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return Image{}, err
	}
	var img Image
	if err := json.Unmarshal(b, &img); err != nil {
		return Image{}, fmt.Errorf("image %q: %w", name, err)
	}
	if _, err := os.Stat(img.Path); err != nil {
		return Image{}, fmt.Errorf("image %q: its file is gone: %w", name, err)
	}
	return img, nil
}

// List returns every named image, by name.
func (s *Store) List() ([]Image, error) {
	ents, err := os.ReadDir(s.refs())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Image
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		if img, err := s.Get(name); err == nil {
			out = append(out, img)
		}
	}
	slices.SortFunc(out, func(a, b Image) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// Remove forgets a name, and removes its file when no other name has it.
// inUse, if set, is asked first whether a VM uses the file.
func (s *Store) Remove(name string, inUse func(path string) bool) error {
	img, err := s.Get(name)
	if err != nil {
		return err
	}
	if inUse != nil && inUse(img.Path) {
		return fmt.Errorf("image %q is in use by a VM on this host (destroy the VM first)", name)
	}
	if err := os.Remove(filepath.Join(s.refs(), name+".json")); err != nil {
		return err
	}
	all, err := s.List()
	if err != nil {
		return err
	}
	for _, o := range all {
		if o.Path == img.Path {
			return nil
		}
	}
	return os.Remove(img.Path)
}

func (s *Store) bySourceDigest(d string) (Image, bool) {
	all, _ := s.List()
	for _, img := range all {
		if img.SourceDigest == d || img.Digest == d {
			return img, true
		}
	}
	return Image{}, false
}

// progress wraps a writer, reporting bytes written.
type progress struct {
	w     io.Writer
	n     int64
	total int64
	last  time.Time
	fn    func(done, total int64)
}

func (p *progress) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.n += int64(n)
	if p.fn != nil && time.Since(p.last) >= progressEvery {
		p.last = time.Now()
		p.fn(p.n, p.total)
	}
	return n, err
}

func (p *progress) done() {
	if p.fn != nil {
		p.fn(p.n, p.total)
	}
}

func digestOf(h hash.Hash) string { return "sha256:" + hex.EncodeToString(h.Sum(nil)) }

// chain is how a pulled file is inspected: it must stand alone.
func (p Policy) chain() imagechain.Policy {
	c := imagechain.Policy{QEMUImg: p.QEMUImg, SelfContained: true, Untrusted: true, TopName: "the downloaded image"}
	bin := p.QEMUImg
	if bin == "" {
		bin = "qemu-img"
	}
	if path, err := exec.LookPath(bin); err == nil {
		c.QEMUImg = path
	} else {
		c.HeaderOnly = true // a host without qemu-img runs no QEMU
	}
	return c
}

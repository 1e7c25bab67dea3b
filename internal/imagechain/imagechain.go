// Package imagechain inspects a disk image and every other file it makes
// QEMU open — backing files, vmdk extents, a qcow2's external data file —
// and refuses a chain that reaches outside the directories allowed, so an
// image cannot make a root QEMU (or qemu-img) read a host file.
//
// Each layer is read in two steps: its header is read here first
// (header.go), and every file it names is checked before anything else
// opens the layer; then `qemu-img info -U` describes that layer alone
// (never --backing-chain, which opens files before they are checked),
// with its format pinned, except the top image's when the caller does not
// know it. A layer's backing file must have its format recorded, so QEMU
// never guesses a format: the layers and their formats are what a QEMU
// command line names explicitly (-blockdev, package qemu).
package imagechain

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ErrRefused is the kind of error a refused image gives; the message says
// which file and which rule.
var ErrRefused = errors.New("image refused")

// Formats are the image formats accepted, in any layer.
var Formats = []string{"qcow2", "raw", "vmdk", "vdi", "vhdx", "vpc", "qed"}

// DefaultMaxVirtualSize bounds a layer's virtual size: the largest disk a
// spec may ask for (spec.disk_gb ≤ 65536, 64 TiB).
const DefaultMaxVirtualSize int64 = 64 << 40

// MaxDepth bounds the number of layers in a chain.
const MaxDepth = 16

// Policy says where a chain may reach.
type Policy struct {
	// QEMUImg is the qemu-img binary (default "qemu-img" from PATH).
	QEMUImg string
	// Roots: every file of the chain (the top image too) must resolve,
	// symlinks followed, inside one of them. Empty: the top image is not
	// checked, and no other file is allowed (SelfContained).
	Roots []string
	// Exclude: and outside each of these (the VMs' work directories).
	Exclude []string
	// SelfContained refuses any file besides the image itself (a pulled
	// image names no file on the host).
	SelfContained bool
	// MaxVirtualSize bounds each layer's virtual size (default
	// DefaultMaxVirtualSize).
	MaxVirtualSize int64
	// HeaderOnly skips qemu-img (hosts without it run no QEMU): only the
	// headers are checked, and layers' formats are those the headers show.
	HeaderOnly bool
	// Untrusted: the image came from elsewhere (a pull). Refusals name
	// the top image TopName and repeat neither the names its headers hold
	// nor qemu-img's words, which may quote the file.
	Untrusted bool
	TopName   string

	top, topGiven string // the top image, resolved and as given
}

// Layer is one image of a chain.
type Layer struct {
	// Path is the file, symlinks resolved.
	Path   string `json:"path"`
	Format string `json:"format"`
	// VirtualSize in bytes (0 when HeaderOnly).
	VirtualSize int64 `json:"virtual_size,omitempty"`
	// Files are the other files this layer opens (vmdk extents, a qcow2
	// data file), resolved.
	Files []string `json:"files,omitempty"`
}

// Chain is an image's layers, the top image first.
type Chain []Layer

// info is the part of `qemu-img info --output=json` used.
type info struct {
	Format         string `json:"format"`
	VirtualSize    int64  `json:"virtual-size"`
	Backing        string `json:"backing-filename"`
	BackingFormat  string `json:"backing-filename-format"`
	FormatSpecific struct {
		Type string `json:"type"`
		Data struct {
			DataFile string `json:"data-file"`
			Extents  []struct {
				Filename string `json:"filename"`
			} `json:"extents"`
		} `json:"data"`
	} `json:"format-specific"`
}

// Inspect reads the chain whose top image is path. format pins the top
// image's format; "" lets qemu-img detect it (a raw guess must look like
// a disk: a whole number of sectors, at least 1 MiB). Every refusal wraps
// ErrRefused and names the file and the rule.
func (p Policy) Inspect(ctx context.Context, path, format string) (Chain, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrRefused, p.show(path), err)
	}
	cur, err := filepath.EvalSymlinks(abs)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s does not exist", ErrRefused, abs)
		}
		return nil, fmt.Errorf("%w: %s cannot be resolved: %v", ErrRefused, abs, err)
	}
	p.top, p.topGiven = cur, abs
	if len(p.Roots) > 0 {
		if err := p.confine(abs, cur, "the image"); err != nil {
			return nil, err
		}
	}
	var chain Chain
	seen := map[string]bool{}
	for depth := 0; ; depth++ {
		if depth == MaxDepth {
			return nil, fmt.Errorf("%w: %s: the backing chain is longer than %d images", ErrRefused, p.show(abs), MaxDepth)
		}
		if seen[cur] {
			return nil, fmt.Errorf("%w: %s: the backing chain loops back to %s", ErrRefused, p.show(abs), p.show(cur))
		}
		seen[cur] = true
		l, backing, backingFmt, err := p.layer(ctx, cur, format, depth == 0)
		if err != nil {
			return nil, err
		}
		chain = append(chain, l)
		if backing == "" {
			return chain, nil
		}
		if backingFmt == "" {
			return nil, fmt.Errorf("%w: %s has backing file %s without its format recorded, so QEMU would guess it; record it with qemu-img rebase -u -F <format> -b %s %s",
				ErrRefused, p.show(cur), backing, backing, p.show(cur))
		}
		cur, format = backing, backingFmt
	}
}

// layer checks one image: the files its header names, then qemu-img's
// description of it. backing is its backing file, resolved and checked.
func (p Policy) layer(ctx context.Context, path, format string, top bool) (l Layer, backing, backingFmt string, err error) {
	st, err := os.Stat(path)
	if err != nil {
		return l, "", "", fmt.Errorf("%w: %s: %v", ErrRefused, p.show(path), err)
	}
	blockDev := st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0
	if !st.Mode().IsRegular() && !(top && blockDev) {
		return l, "", "", fmt.Errorf("%w: %s is not a regular file (%s); an image and every file it names must be", ErrRefused, p.show(path), st.Mode().Type())
	}
	h, err := readHeader(path, format)
	if err != nil {
		return l, "", "", fmt.Errorf("%w: %s: reading its header: %v", ErrRefused, p.show(path), err)
	}
	for _, r := range h.refs {
		if _, err := p.file(path, r.kind, r.name); err != nil {
			return l, "", "", err
		}
	}
	l = Layer{Path: path, Format: format}
	if p.HeaderOnly {
		if l.Format == "" {
			l.Format = h.format
		}
		for _, r := range h.refs {
			res, _ := p.file(path, r.kind, r.name)
			if r.kind == kindBacking {
				backing, backingFmt = res, h.backingFmt
			} else {
				l.Files = append(l.Files, res)
			}
		}
		return l, backing, backingFmt, nil
	}
	in, err := p.info(ctx, path, format)
	if err != nil {
		return l, "", "", err
	}
	l.Format, l.VirtualSize = in.Format, in.VirtualSize
	if !slices.Contains(Formats, in.Format) {
		return l, "", "", fmt.Errorf("%w: %s has format %q; use one of %s", ErrRefused, p.show(path), in.Format, strings.Join(Formats, ", "))
	}
	if format == "" && in.Format == "raw" && (st.Size() < 1<<20 || st.Size()%512 != 0) && !blockDev {
		return l, "", "", fmt.Errorf("%w: %s does not look like a disk image (%d bytes, not a whole number of 512-byte sectors of at least 1 MiB); use a qcow2 or raw disk", ErrRefused, p.show(path), st.Size())
	}
	if max := p.maxVirtualSize(); in.VirtualSize > max || in.VirtualSize < 0 {
		return l, "", "", fmt.Errorf("%w: %s has a virtual size of %d bytes, more than the %d bytes (%d GiB) allowed", ErrRefused, p.show(path), in.VirtualSize, max, max>>30)
	}
	var names []string
	if in.FormatSpecific.Data.DataFile != "" {
		names = append(names, in.FormatSpecific.Data.DataFile)
	}
	for _, e := range in.FormatSpecific.Data.Extents {
		names = append(names, e.Filename)
	}
	for _, n := range names {
		kind := kindExtent
		if n == in.FormatSpecific.Data.DataFile {
			kind = kindDataFile
		}
		res, err := p.file(path, kind, n)
		if err != nil {
			return l, "", "", err
		}
		if res != path && !slices.Contains(l.Files, res) {
			l.Files = append(l.Files, res)
		}
	}
	if in.Backing != "" {
		if backing, err = p.file(path, kindBacking, in.Backing); err != nil {
			return l, "", "", err
		}
		backingFmt = in.BackingFormat
	}
	return l, backing, backingFmt, nil
}

func (p Policy) info(ctx context.Context, path, format string) (info, error) {
	var in info
	bin := p.QEMUImg
	if bin == "" {
		bin = "qemu-img"
	}
	args := []string{"info", "--output=json", "-U"}
	if format != "" {
		args = append(args, "-f", format)
	}
	// A layer's description takes well under a second; a file that
	// blocks (which the checks above should never let through) must not
	// hang the caller.
	ictx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ictx, bin, append(args, path)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" || p.Untrusted {
			msg = err.Error()
		}
		return in, fmt.Errorf("%w: %s is not a disk image QEMU can read: %s", ErrRefused, p.show(path), msg)
	}
	if err := json.Unmarshal(stdout.Bytes(), &in); err != nil {
		return in, fmt.Errorf("%w: %s: reading qemu-img info: %v", ErrRefused, p.show(path), err)
	}
	return in, nil
}

func (p Policy) maxVirtualSize() int64 {
	if p.MaxVirtualSize > 0 {
		return p.MaxVirtualSize
	}
	return DefaultMaxVirtualSize
}

// Kinds of file a layer names.
const (
	kindBacking  = "backing file"
	kindExtent   = "vmdk extent"
	kindDataFile = "external data file"
)

// file resolves a file that layer names (relative to the layer's
// directory, as QEMU does) and checks it.
func (p Policy) file(layer, kind, name string) (string, error) {
	abs := name
	if !filepath.IsAbs(abs) {
		abs = filepath.Join(filepath.Dir(layer), name)
	}
	if p.SelfContained || len(p.Roots) == 0 {
		if !hasProtocol(name) {
			if res, err := filepath.EvalSymlinks(abs); err == nil && res == layer {
				return res, nil // a vmdk that is its own extent
			}
		}
		if p.Untrusted {
			return "", fmt.Errorf("%w: %s names a %s: an image must stand alone here (a pulled image may name no other file)", ErrRefused, p.show(layer), kind)
		}
		return "", fmt.Errorf("%w: %s has %s %s: an image must stand alone here", ErrRefused, p.show(layer), kind, strconv.Quote(shorten(name)))
	}
	if hasProtocol(name) {
		return "", fmt.Errorf("%w: %s has %s %s, which names a protocol or options instead of a file", ErrRefused, p.show(layer), kind, strconv.Quote(shorten(name)))
	}
	res, err := filepath.EvalSymlinks(abs)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("%w: %s has %s %s, which does not exist", ErrRefused, p.show(layer), kind, abs)
		}
		return "", fmt.Errorf("%w: %s has %s %s, which cannot be resolved: %v", ErrRefused, p.show(layer), kind, abs, err)
	}
	if err := p.confine(abs, res, p.show(layer)+"'s "+kind); err != nil {
		return "", err
	}
	if st, err := os.Stat(res); err != nil || !st.Mode().IsRegular() {
		return "", fmt.Errorf("%w: %s has %s %s, which is not a regular file", ErrRefused, p.show(layer), kind, abs)
	}
	return res, nil
}

// confine checks that res (what path resolves to) is inside a root and
// outside every excluded directory.
func (p Policy) confine(path, res, what string) error {
	shown := path
	if res != path {
		shown = fmt.Sprintf("%s (resolving to %s)", path, res)
	}
	for _, d := range p.Exclude {
		if Within(res, resolveDir(d)) {
			return fmt.Errorf("%w: %s %s is inside the VMs' work directory %s", ErrRefused, what, shown, d)
		}
	}
	for _, r := range p.Roots {
		if Within(res, resolveDir(r)) {
			return nil
		}
	}
	return fmt.Errorf("%w: %s %s is outside every image root (%s)", ErrRefused, what, shown, strings.Join(p.Roots, ", "))
}

// show is how a refusal names a file of the chain.
func (p Policy) show(path string) string {
	if p.TopName != "" && (path == p.top || path == p.topGiven) {
		return p.TopName
	}
	return path
}

// shorten cuts a name to 128 bytes.
func shorten(s string) string {
	if len(s) > 128 {
		return s[:128] + "…"
	}
	return s
}

// hasProtocol says whether QEMU reads name as a protocol ("nbd:…",
// "json:{…}", "file:…"): a colon before any slash.
func hasProtocol(name string) bool {
	i := strings.IndexAny(name, ":/")
	return i >= 0 && name[i] == ':'
}

// resolveDir follows the symlinks of a directory that exists, else cleans it.
func resolveDir(dir string) string {
	if r, err := filepath.EvalSymlinks(dir); err == nil {
		return r
	}
	return filepath.Clean(dir)
}

// Within reports whether path is dir or below it.
func Within(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && !filepath.IsAbs(rel)
}

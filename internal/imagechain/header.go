package imagechain

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"regexp"
)

// header is what a layer's header says before anything opens the layer:
// its format, when the magic shows it, and the files it names.
type header struct {
	format     string
	backingFmt string
	refs       []ref
}

type ref struct{ kind, name string }

// maxDescriptor is as much of a vmdk descriptor as QEMU reads (1 MiB).
const maxDescriptor = 1<<20 - 1

var (
	qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}
	qedMagic   = []byte{'Q', 'E', 'D', 0}
	vmdk4Magic = []byte{'K', 'D', 'M', 'V'}
	// An extent line, as QEMU's vmdk driver reads it:
	// RW 2048 FLAT "file.raw" 0.
	extentLine = regexp.MustCompile(`(?m)^[ \t]*(?:RW|RDONLY|NOACCESS)[ \t]+\d+[ \t]+(\S+)[ \t]+"([^"\r\n]*)"`)
	// QEMU takes the first quoted string after parentFileNameHint.
	parentHint = regexp.MustCompile(`parentFileNameHint[^"]*"([^"]*)"`)
)

// qcow2 header extension types (docs/interop/qcow2.txt in QEMU).
const (
	qcow2ExtEnd        = 0
	qcow2ExtBackingFmt = 0xe2792aca
	qcow2ExtDataFile   = 0x44415441
)

// readHeader reads the files a qcow2, qed or vmdk header names. Any other
// file whose format is vmdk or not known yet is read as QEMU's vmdk
// driver would read a descriptor (its first MiB).
func readHeader(path, format string) (header, error) {
	f, err := os.Open(path)
	if err != nil {
		return header{}, err
	}
	defer f.Close()
	buf := make([]byte, 2<<20)
	n, err := io.ReadFull(f, buf)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return header{}, err
	}
	buf = buf[:n]
	switch {
	case bytes.HasPrefix(buf, qcow2Magic):
		return qcow2Header(buf)
	case bytes.HasPrefix(buf, qedMagic):
		return qedHeader(buf)
	case bytes.HasPrefix(buf, vmdk4Magic):
		return vmdk4Header(buf)
	}
	if format != "" && format != "vmdk" {
		return header{format: format}, nil
	}
	h := descriptorRefs(buf[:min(len(buf), maxDescriptor)])
	h.format = "raw"
	if len(h.refs) > 0 || format == "vmdk" {
		h.format = "vmdk"
	}
	return h, nil
}

func qcow2Header(b []byte) (header, error) {
	h := header{format: "qcow2"}
	be := binary.BigEndian
	if len(b) < 72 {
		return h, fmt.Errorf("a qcow2 header shorter than 72 bytes")
	}
	version := be.Uint32(b[4:])
	off, size := be.Uint64(b[8:]), be.Uint32(b[16:])
	if off != 0 {
		name, err := slice(b, off, uint64(size))
		if err != nil {
			return h, fmt.Errorf("backing file name: %w", err)
		}
		h.refs = append(h.refs, ref{kindBacking, string(name)})
	}
	ext := uint64(72)
	if version >= 3 {
		if len(b) < 104 {
			return h, fmt.Errorf("a qcow2 v3 header shorter than 104 bytes")
		}
		ext = uint64(be.Uint32(b[100:]))
	}
	for {
		hd, err := slice(b, ext, 8)
		if err != nil {
			return h, fmt.Errorf("header extensions: %w", err)
		}
		typ, n := be.Uint32(hd), be.Uint32(hd[4:])
		if typ == qcow2ExtEnd {
			return h, nil
		}
		data, err := slice(b, ext+8, uint64(n))
		if err != nil {
			return h, fmt.Errorf("header extension %#x: %w", typ, err)
		}
		switch typ {
		case qcow2ExtBackingFmt:
			h.backingFmt = string(data)
		case qcow2ExtDataFile:
			h.refs = append(h.refs, ref{kindDataFile, string(data)})
		}
		ext += 8 + (uint64(n)+7)&^7
	}
}

func qedHeader(b []byte) (header, error) {
	h := header{format: "qed"}
	le := binary.LittleEndian
	if len(b) < 64 {
		return h, fmt.Errorf("a qed header shorter than 64 bytes")
	}
	const hasBacking = 0x01
	if le.Uint64(b[16:])&hasBacking != 0 {
		name, err := slice(b, uint64(le.Uint32(b[56:])), uint64(le.Uint32(b[60:])))
		if err != nil {
			return h, fmt.Errorf("backing file name: %w", err)
		}
		h.refs = append(h.refs, ref{kindBacking, string(name)})
	}
	return h, nil
}

// vmdk4Header reads a sparse vmdk's embedded descriptor: QEMU takes its
// parent (a backing file) from it and, when the header's capacity is 0,
// its extents too.
func vmdk4Header(b []byte) (header, error) {
	le := binary.LittleEndian
	if len(b) < 44 {
		return header{format: "vmdk"}, fmt.Errorf("a vmdk header shorter than 44 bytes")
	}
	descOff, descSize := le.Uint64(b[28:])*512, le.Uint64(b[36:])*512
	if descOff == 0 {
		return header{format: "vmdk"}, nil
	}
	desc, err := slice(b, descOff, min(descSize, maxDescriptor))
	if err != nil {
		return header{format: "vmdk"}, fmt.Errorf("embedded descriptor: %w", err)
	}
	h := descriptorRefs(desc)
	h.format = "vmdk"
	if capacity := le.Uint64(b[12:]); capacity != 0 {
		// The file is its own extent; the descriptor's extent lines are
		// not read.
		refs := h.refs[:0]
		for _, r := range h.refs {
			if r.kind != kindExtent {
				refs = append(refs, r)
			}
		}
		h.refs = refs
	}
	return h, nil
}

// descriptorRefs are the extents and the parent a vmdk descriptor names.
func descriptorRefs(b []byte) header {
	var h header
	for _, m := range extentLine.FindAllSubmatch(b, -1) {
		if string(m[1]) == "ZERO" {
			continue
		}
		h.refs = append(h.refs, ref{kindExtent, string(m[2])})
	}
	if m := parentHint.FindSubmatch(b); m != nil && len(m[1]) > 0 {
		h.refs = append(h.refs, ref{kindBacking, string(m[1])})
		h.backingFmt = "vmdk"
	}
	return h
}

// slice is b[off:off+n], or an error naming what lies beyond the header read.
func slice(b []byte, off, n uint64) ([]byte, error) {
	if off > uint64(len(b)) || n > uint64(len(b))-off {
		return nil, fmt.Errorf("%d bytes at offset %d lie beyond the first %d bytes of the file", n, off, len(b))
	}
	return b[off : off+n], nil
}

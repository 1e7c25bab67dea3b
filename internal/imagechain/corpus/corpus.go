// Package corpus makes hostile disk images for tests: images whose chain
// (backing files, vmdk extents and parents, a qcow2's external data file)
// reaches a file outside the image roots, or that QEMU would have to guess
// a format for, or that are too big or loop. Every layer of vmdk that
// reads images (imagechain, the QEMU backend's prepare and start, the
// worker, the image store) must refuse each with the reason Want names.
package corpus

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

// Case is one hostile image.
type Case struct {
	Name string
	// Path is the image, inside the root.
	Path string
	// Want is part of the refusal.
	Want string
}

// SecretName is the file, in the outside directory, that no image may
// reach: a raw "disk" of 1 MiB whose bytes are Secret, repeated.
const SecretName = "secret.raw"

// Secret is what the outside file holds.
var Secret = []byte("vmherd-hostile-corpus-secret\n")

// Images writes the hostile images into root (an image root) and the files
// they aim at into outside (a directory that is no image root, beside
// root), and returns them. qemuImg is the qemu-img binary ("" for PATH).
func Images(t testing.TB, qemuImg, root, outside string) []Case {
	t.Helper()
	if qemuImg == "" {
		qemuImg = "qemu-img"
	}
	img := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(qemuImg, args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v: %s", args, err, out)
		}
	}
	in := func(name string) string { return filepath.Join(root, name) }
	write := func(path string, b []byte) {
		t.Helper()
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	secret := filepath.Join(outside, SecretName)
	write(secret, bytes.Repeat(Secret, (1<<20)/len(Secret)+1)[:1<<20])
	rel, err := filepath.Rel(root, secret)
	if err != nil {
		t.Fatal(err)
	}
	var cases []Case
	add := func(name, path, want string) { cases = append(cases, Case{Name: name, Path: path, Want: want}) }

	// qcow2 backing files.
	img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret, in("backing-abs.qcow2"))
	add("qcow2 backing file outside the roots", in("backing-abs.qcow2"), "backing file "+secret+" is outside every image root")
	img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", rel, in("backing-rel.qcow2"), "1M")
	add("qcow2 backing file through ..", in("backing-rel.qcow2"), "is outside every image root")
	if err := os.Symlink(secret, in("link.raw")); err != nil {
		t.Fatal(err)
	}
	img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "link.raw", in("backing-symlink.qcow2"), "1M")
	add("qcow2 backing file a symlink to outside", in("backing-symlink.qcow2"), "resolving to "+secret)
	img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", `json:{"driver":"file","filename":"`+secret+`"}`, in("backing-json.qcow2"), "1M")
	add("qcow2 backing file json: options", in("backing-json.qcow2"), "names a protocol or options")
	img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "nbd:127.0.0.1:10809", in("backing-nbd.qcow2"), "1M")
	add("qcow2 backing file over nbd", in("backing-nbd.qcow2"), "names a protocol or options")
	write(in("inside.raw"), make([]byte, 1<<20))
	img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", in("inside.raw"), in("backing-nofmt.qcow2"))
	dropBackingFormat(t, in("backing-nofmt.qcow2"))
	add("qcow2 backing file without its format", in("backing-nofmt.qcow2"), "without its format recorded")
	img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret, in("deep2.qcow2"))
	img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", in("deep2.qcow2"), in("deep1.qcow2"))
	add("qcow2 whose second layer leaves the roots", in("deep1.qcow2"), "deep2.qcow2's backing file "+secret)
	img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", in("loop-b.qcow2"), in("loop-a.qcow2"), "1M")
	img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", in("loop-a.qcow2"), in("loop-b.qcow2"), "1M")
	add("qcow2 backing chain loop", in("loop-a.qcow2"), "loops back")
	prev := ""
	for i := 0; i < 17; i++ {
		p := in("long-" + strconv.Itoa(i) + ".qcow2")
		if prev == "" {
			img("create", "-q", "-f", "qcow2", p, "1M")
		} else {
			img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", prev, p, "1M")
		}
		prev = p
	}
	add("qcow2 backing chain of 17 images", prev, "longer than 16")

	// A qcow2's external data file.
	img("create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(outside, "data.raw"), in("datafile.qcow2"), "1M")
	add("qcow2 external data file outside the roots", in("datafile.qcow2"), "external data file "+filepath.Join(outside, "data.raw")+" is outside")

	// vmdk extents and parents.
	write(in("flat.vmdk"), descriptor(`RW 2048 FLAT "`+secret+`" 0`))
	add("vmdk FLAT extent outside the roots", in("flat.vmdk"), "vmdk extent "+secret+" is outside every image root")
	write(in("flat-rel.vmdk"), descriptor(`RW 2048 FLAT "`+rel+`" 0`))
	add("vmdk FLAT extent through ..", in("flat-rel.vmdk"), "vmdk extent")
	if err := exec.Command("mkfifo", in("fifo.raw")).Run(); err != nil {
		t.Fatal(err)
	}
	write(in("flat-fifo.vmdk"), descriptor(`RW 2048 FLAT "fifo.raw" 0`))
	add("vmdk extent that is a FIFO", in("flat-fifo.vmdk"), "not a regular file")
	img("create", "-q", "-f", "vmdk", filepath.Join(outside, "parent.vmdk"), "1M")
	img("create", "-q", "-f", "vmdk", "-F", "vmdk", "-b", filepath.Join(outside, "parent.vmdk"), in("child.vmdk"))
	add("sparse vmdk with a parent outside the roots", in("child.vmdk"), "backing file "+filepath.Join(outside, "parent.vmdk"))
	img("create", "-q", "-f", "vmdk", in("embedded.vmdk"), "1M")
	embedDescriptor(t, in("embedded.vmdk"), `RW 2048 FLAT "`+secret+`" 0`)
	add("sparse vmdk of capacity 0 whose descriptor names a FLAT extent outside", in("embedded.vmdk"), "vmdk extent "+secret)

	// qed backing file.
	img("create", "-q", "-f", "qed", "-F", "raw", "-b", secret, in("backing.qed"))
	add("qed backing file outside the roots", in("backing.qed"), "backing file "+secret)

	// Size.
	img("create", "-q", "-f", "qcow2", in("huge.qcow2"), "100T")
	add("qcow2 of 100 TiB virtual size", in("huge.qcow2"), "virtual size of 109951162777600 bytes")

	// The image itself outside, through a symlink.
	img("create", "-q", "-f", "qcow2", filepath.Join(outside, "plain.qcow2"), "1M")
	if err := os.Symlink(filepath.Join(outside, "plain.qcow2"), in("escape.qcow2")); err != nil {
		t.Fatal(err)
	}
	add("image that is a symlink to outside", in("escape.qcow2"), "outside every image root")
	return cases
}

// descriptor is a monolithicFlat vmdk descriptor with one extent line.
func descriptor(extent string) []byte {
	return []byte("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n" +
		extent + "\n\nddb.virtualHWVersion = \"4\"\n")
}

// dropBackingFormat ends a qcow2's header extensions where its backing
// format extension is, as an image made before QEMU recorded it would be.
func dropBackingFormat(t testing.TB, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b[:4096], []byte{0xe2, 0x79, 0x2a, 0xca})
	if i < 0 {
		t.Fatalf("%s has no backing format extension", path)
	}
	copy(b[i:], make([]byte, 4))
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// embedDescriptor sets a sparse vmdk's capacity to 0 and its embedded
// descriptor to one naming extent, which QEMU then reads as the disk.
func embedDescriptor(t testing.TB, path, extent string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	off, size := le.Uint64(b[28:])*512, le.Uint64(b[36:])*512
	d := descriptor(extent)
	if off == 0 || uint64(len(d)) > size || off+size > uint64(len(b)) {
		t.Fatalf("%s: no room for the descriptor (offset %d, size %d)", path, off, size)
	}
	le.PutUint64(b[12:], 0)
	copy(b[off:off+size], make([]byte, size))
	copy(b[off:], d)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

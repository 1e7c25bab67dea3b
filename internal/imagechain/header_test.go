package imagechain

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// FuzzReadHeader: no header, however broken, panics or hangs the reader.
func FuzzReadHeader(f *testing.F) {
	q := make([]byte, 512)
	copy(q, qcow2Magic)
	binary.BigEndian.PutUint32(q[4:], 3)
	binary.BigEndian.PutUint32(q[100:], 104)
	binary.BigEndian.PutUint32(q[104:], qcow2ExtDataFile)
	binary.BigEndian.PutUint32(q[108:], 8)
	copy(q[112:], "data.raw")
	f.Add(q, "")
	v := make([]byte, 1024)
	copy(v, vmdk4Magic)
	binary.LittleEndian.PutUint64(v[28:], 1)
	binary.LittleEndian.PutUint64(v[36:], 1)
	copy(v[512:], "RW 8 FLAT \"x.raw\" 0\nparentFileNameHint=\"p.vmdk\"\n")
	f.Add(v, "vmdk")
	f.Add([]byte("# Disk DescriptorFile\nRW 8 FLAT \"/etc/shadow\" 0\n"), "")
	f.Add(append([]byte("QED\x00"), make([]byte, 60)...), "qed")
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte, format string) {
		p := filepath.Join(dir, "img")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		h, err := readHeader(p, format)
		if err == nil && h.format == "" {
			t.Fatalf("no format for %q", b)
		}
	})
}

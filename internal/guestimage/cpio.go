package guestimage

import (
	"fmt"
	"io"
	"path"
)

// cpioWriter writes the "newc" (SVR4, no checksum) cpio format the kernel
// unpacks as an initramfs. Every entry is owned by root with mtime 0, and
// inode numbers count up from 1, so the archive depends only on its entries.
// Writing it ourselves lets an unprivileged build add /dev/console.
type cpioWriter struct {
	w    io.Writer
	ino  uint32
	err  error
	dirs map[string]bool
}

const (
	cpioModeDir  = 0o040000
	cpioModeFile = 0o100000
	cpioModeLink = 0o120000
	cpioModeChr  = 0o020000
)

func (c *cpioWriter) entry(name string, mode uint32, data []byte, rmajor, rminor uint32) {
	if c.err != nil {
		return
	}
	c.ino++
	nlink := uint32(1)
	if mode&0o170000 == cpioModeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name))
	c.write([]byte{0})
	c.pad(len(hdr) + len(name) + 1)
	c.write(data)
	c.pad(len(data))
}

func (c *cpioWriter) write(b []byte) {
	if c.err != nil || len(b) == 0 {
		return
	}
	_, c.err = c.w.Write(b)
}

func (c *cpioWriter) pad(n int) {
	if r := n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) Dir(name string) {
	if c.dirs == nil {
		c.dirs = map[string]bool{}
	}
	c.dirs[name] = true
	c.entry(name, cpioModeDir|0o755, nil, 0, 0)
}

// MkdirAll adds name and the parents of it the archive does not have yet.
func (c *cpioWriter) MkdirAll(name string) {
	if name == "." || name == "/" || name == "" || c.dirs[name] {
		return
	}
	c.MkdirAll(path.Dir(name))
	c.Dir(name)
}
func (c *cpioWriter) File(name string, perm uint32, data []byte) {
	c.entry(name, cpioModeFile|perm, data, 0, 0)
}
func (c *cpioWriter) Symlink(name, target string) {
	c.entry(name, cpioModeLink|0o777, []byte(target), 0, 0)
}
func (c *cpioWriter) CharDev(name string, perm, major, minor uint32) {
	c.entry(name, cpioModeChr|perm, nil, major, minor)
}

// Close writes the trailer.
func (c *cpioWriter) Close() error {
	c.ino = 0
	c.entry("TRAILER!!!", 0, nil, 0, 0)
	return c.err
}

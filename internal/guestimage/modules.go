package guestimage

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// guestModules are the kernel modules the guest needs beyond what Debian's
// kernel has built in, named as in modules.dep (without .ko):
// virtio-net (with failover), virtio-blk (its own disk, which the
// migration tests write to), the AHCI CD-ROM that carries the seed on q35,
// iso9660, and evdev + button so acpid sees the power button.
var guestModules = []string{
	"virtio_pci", "virtio_net", "virtio_blk",
	"ahci", "sr_mod", "isofs",
	"evdev", "button",
}

// resolveModules returns the .ko paths (relative to modDir) of mods and
// everything they depend on, in an order insmod can load them: each module
// after its dependencies. Built-in modules are skipped.
func resolveModules(modDir string, mods []string) ([]string, error) {
	deps, err := readModulesDep(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	builtin := map[string]bool{}
	if f, err := os.Open(filepath.Join(modDir, "modules.builtin")); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			builtin[modName(s.Text())] = true
		}
		f.Close()
	}
	byName := map[string]string{}
	for path := range deps {
		byName[modName(path)] = path
	}
	var order []string
	seen := map[string]bool{}
	var visit func(path string, depth int) error
	visit = func(path string, depth int) error {
		if seen[path] {
			return nil
		}
		if depth > 64 {
			return fmt.Errorf("module dependency loop at %s", path)
		}
		// modules.dep lists the full closure; the last entries are the
		// deepest, so load from the end backwards, recursively.
		ds := deps[path]
		for i := len(ds) - 1; i >= 0; i-- {
			if err := visit(ds[i], depth+1); err != nil {
				return err
			}
		}
		seen[path] = true
		order = append(order, path)
		return nil
	}
	for _, m := range mods {
		name := strings.ReplaceAll(m, "-", "_")
		path, ok := byName[name]
		if !ok {
			if builtin[name] {
				continue
			}
			return nil, fmt.Errorf("kernel module %s is neither in %s/modules.dep nor built in", m, modDir)
		}
		if err := visit(path, 0); err != nil {
			return nil, err
		}
	}
	return order, nil
}

func readModulesDep(path string) (map[string][]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	deps := map[string][]string{}
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		mod, rest, ok := strings.Cut(s.Text(), ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
	}
	return deps, s.Err()
}

// modName turns "kernel/drivers/net/virtio_net.ko" into "virtio_net".
func modName(path string) string {
	base := filepath.Base(strings.TrimSpace(path))
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		base = strings.TrimSuffix(base, ext)
	}
	return strings.ReplaceAll(strings.TrimSuffix(base, ".ko"), "-", "_")
}

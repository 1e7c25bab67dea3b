package guestimage

import (
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"slices"
)

// libDirs are where a Debian amd64 host keeps shared libraries.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/lib", "/usr/lib"}

// sharedLibs returns the files a dynamically linked program needs at run
// time: its interpreter and the shared libraries it (and they) import,
// found as the host's dynamic loader would find them on Debian.
func sharedLibs(programs ...string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	var visit func(path string) error
	visit = func(path string) error {
		f, err := elf.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				b := make([]byte, p.Filesz)
				if _, err := p.ReadAt(b, 0); err != nil {
					return err
				}
				interp := string(b[:len(b)-1]) // NUL-terminated
				if !seen[interp] {
					seen[interp] = true
					out = append(out, interp)
				}
			}
		}
		libs, err := f.ImportedLibraries()
		if err != nil {
			return err
		}
		for _, l := range libs {
			if seen[l] {
				continue
			}
			seen[l] = true
			found := ""
			for _, d := range libDirs {
				if _, err := os.Stat(filepath.Join(d, l)); err == nil {
					found = filepath.Join(d, l)
					break
				}
			}
			if found == "" {
				return fmt.Errorf("%s needs %s, which is not in %v", path, l, libDirs)
			}
			out = append(out, found)
			if err := visit(found); err != nil {
				return err
			}
		}
		return nil
	}
	for _, p := range programs {
		if err := visit(p); err != nil {
			return nil, err
		}
	}
	slices.Sort(out)
	return out, nil
}

package worker

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ErrImagePath is the kind of error an image path the worker refuses
// gives (the prepare's failed event says which rule and the roots).
var ErrImagePath = errors.New("image path refused")

// checkImage resolves a spec's image path (symlinks followed) and returns
// it if it lies inside one of the worker's image roots and outside every
// VM work directory; the backend is given the resolved path, so a symlink
// changed afterwards does not change what is opened. Anything else is an
// error naming the rule and the allowed roots.
func (w *Worker) checkImage(path string) (string, error) {
	roots := strings.Join(w.cfg.ImageRoots, ", ")
	if roots == "" {
		roots = "none: start the worker with --image-dir"
	}
	refuse := func(format string, args ...any) (string, error) {
		return "", fmt.Errorf("%w: spec.image_path %q %s (this worker's image roots: %s)", ErrImagePath, path, fmt.Sprintf(format, args...), roots)
	}
	if !filepath.IsAbs(path) {
		return refuse("is not an absolute path")
	}
	resolved, err := filepath.EvalSymlinks(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return refuse("does not exist")
		}
		return refuse("cannot be resolved: %v", err)
	}
	for _, d := range w.cfg.VMDirs {
		if within(resolved, resolve(d)) {
			return refuse("is inside the VMs' work directory %s (another VM's disk is never a base image)", d)
		}
	}
	for _, r := range w.cfg.ImageRoots {
		if within(resolved, resolve(r)) {
			return resolved, nil
		}
	}
	if resolved != path {
		return refuse("resolves to %s, which is outside every image root", resolved)
	}
	return refuse("is outside every image root")
}

// resolve follows the symlinks of a directory that exists, else cleans it.
func resolve(dir string) string {
	if r, err := filepath.EvalSymlinks(dir); err == nil {
		return r
	}
	return filepath.Clean(dir)
}

// within reports whether path is dir or below it.
func within(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && !filepath.IsAbs(rel)
}

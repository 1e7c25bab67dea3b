package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/imagechain"
)

// Files in a work dir.
const (
	recordFile  = "vm.json"
	diskFile    = "disk.qcow2"
	seedFile    = "seed.iso"
	varsFile    = "OVMF_VARS.fd"
	pidFile     = "qemu.pid"
	qmpSock     = "qmp.sock"
	serialSock  = "serial.sock"
	vncSock     = "vnc.sock" // the display, for root on the host only
	consoleLog  = "console.log"
	stderrFile  = "qemu.stderr"
	maxSockPath = 107 // sun_path is 108 bytes with the NUL
)

// record is what vm.json holds.
type record struct {
	Version int    `json:"version"`
	Handle  handle `json:"handle"`
	// Chain is the base image's chain as last checked (Prepare, Start):
	// QEMU is given these layers with these formats (-blockdev).
	Chain imagechain.Chain `json:"chain,omitempty"`
}

// workDir returns <data_dir>/vms/<name>, after checking the name and that
// the path stays under the data dir.
func (b *Backend) workDir(name string) (string, error) {
	if err := api.ValidateName(name); err != nil {
		return "", err
	}
	wd := filepath.Join(b.vmsDir, name)
	rel, err := filepath.Rel(b.vmsDir, wd)
	if err != nil || rel != name || strings.HasPrefix(rel, "..") {
		return "", fmt.Errorf("%w: vm name %q leaves the data dir", api.ErrInvalid, name)
	}
	return wd, nil
}

// load reads the record of h's VM. A missing record, or one of another
// incarnation than h.ID (when set), is backends.ErrNotFound.
// lockLoad checks the name, takes the VM's lock (bounded by ctx) and loads
// its record: the start of every call that acts on a prepared VM. The
// caller runs unlock when done; on an error nothing is held.
func (b *Backend) lockLoad(ctx context.Context, h api.VmHandle) (*record, func(), error) {
	if _, err := b.workDir(h.Name); err != nil {
		return nil, nil, err
	}
	unlock, err := b.lockCtx(ctx, h.Name)
	if err != nil {
		return nil, nil, err
	}
	r, err := b.load(h)
	if err != nil {
		unlock()
		return nil, nil, err
	}
	return r, unlock, nil
}

func (b *Backend) load(h api.VmHandle) (*record, error) {
	wd, err := b.workDir(h.Name)
	if err != nil {
		return nil, err
	}
	r, err := readRecord(wd)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("no work dir %s: %w; prepare it first", wd, backends.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	if h.ID != "" && r.Handle.ID != h.ID {
		return nil, fmt.Errorf("handle %s is not the current incarnation (%s): %w", h.ID, r.Handle.ID, backends.ErrNotFound)
	}
	return r, nil
}

func readRecord(wd string) (*record, error) {
	b, err := os.ReadFile(filepath.Join(wd, recordFile))
	if err != nil {
		return nil, err
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("reading %s: %w", filepath.Join(wd, recordFile), err)
	}
	return &r, nil
}

// save writes the record atomically.
func (r *record) save() error {
	wd := r.Handle.WorkDir
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(wd, ".vm.json-")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Rename(tmp.Name(), filepath.Join(wd, recordFile)); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return nil
}

// allRecords reads every VM's record but skip's (for uniqueness checks).
func (b *Backend) allRecords(skip string) []*record {
	ents, err := os.ReadDir(b.vmsDir)
	if err != nil {
		return nil
	}
	var out []*record
	for _, e := range ents {
		if !e.IsDir() || e.Name() == skip {
			continue
		}
		if r, err := readRecord(filepath.Join(b.vmsDir, e.Name())); err == nil {
			out = append(out, r)
		}
	}
	return out
}

func (r *record) path(name string) string { return filepath.Join(r.Handle.WorkDir, name) }

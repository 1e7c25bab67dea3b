package vmfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// ErrPathRefused is wrapped by every error Check returns for a path the
// VMFile may not name.
var ErrPathRefused = errors.New("path refused")

// Access says which local files a VMFile may name beyond its own
// directory. A VMFile may come from a repository its user did not
// write, so by default it reaches only the files under its directory;
// the user widens that on the command line, never the VMFile.
type Access struct {
	// Allow lists directories (vmctl --allow-path) whose files the
	// VMFile may name too.
	Allow []string
	// Secrets lists files (vmctl --allow-secret) that may go into a spec
	// or a guest although they look like secrets.
	Secrets []string
}

// use is where a file's content goes.
type use int

const (
	useSpec  use = iota // into the VM's spec, which every viewer reads
	useGuest            // copied into the guest (and echoed into VM_SSH)
	useLocal            // read by vmctl only (the ssh private key)
)

// Check confines the local files every VM of f names: each must resolve
// (symlinks followed, ~ and .. included) to a regular file under the
// VMFile's own directory or a directory of a.Allow, and a file whose
// content goes into a spec or a guest must not look like a secret
// (private keys, NATS credentials and nkey seeds) unless a.Secrets names
// it. Paths are replaced by what they resolve to, so what is read later
// is what was checked. The first refusal is returned, wrapping
// ErrPathRefused and naming the VM, the node, the path and the rule.
func (f *File) Check(a Access) error {
	dir, err := filepath.EvalSymlinks(filepath.Dir(f.Path))
	if err != nil {
		return fmt.Errorf("the VMFile's directory: %w", err)
	}
	roots := []string{dir}
	for _, d := range a.Allow {
		r, err := realPath(d)
		if err != nil {
			return fmt.Errorf("--allow-path %s: %w", d, err)
		}
		roots = append(roots, r)
	}
	secrets := map[string]bool{}
	for _, s := range a.Secrets {
		r, err := realPath(s)
		if err != nil {
			return fmt.Errorf("--allow-secret %s: %w", s, err)
		}
		secrets[r] = true
	}
	c := checker{dir: dir, roots: roots, secrets: secrets}
	for i := range f.VMs {
		d := &f.VMs[i]
		where := fmt.Sprintf("vm %q", d.Name)
		if ci := d.CloudInit; ci != nil {
			if err := c.check(where, "cloud-init user-data", &ci.UserData, useSpec); err != nil {
				return err
			}
			if err := c.check(where, "cloud-init ssh-key", &ci.SSHKey, useSpec); err != nil {
				return err
			}
		}
		if d.SSH != nil {
			if err := c.check(where, "ssh private-key", &d.SSH.PrivateKey, useLocal); err != nil {
				return err
			}
		}
		for j := range d.Provision {
			s := &d.Provision[j]
			if err := c.check(where, fmt.Sprintf("provision %q script", s.Kind), &s.Script, useGuest); err != nil {
				return err
			}
			if err := c.check(where, fmt.Sprintf("provision %q source", s.Kind), &s.Source, useGuest); err != nil {
				return err
			}
		}
	}
	return nil
}

func realPath(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(abs)
}

type checker struct {
	dir     string
	roots   []string
	secrets map[string]bool
}

func (c checker) check(where, node string, p *string, u use) error {
	if *p == "" {
		return nil
	}
	refuse := func(format string, args ...any) error {
		return fmt.Errorf("%s: %s %s: %w: %s", where, node, *p, ErrPathRefused, fmt.Sprintf(format, args...))
	}
	real, err := filepath.EvalSymlinks(*p)
	if err != nil {
		return fmt.Errorf("%s: %s %s: %w", where, node, *p, err)
	}
	via := ""
	if real != *p {
		via = " (it resolves to " + real + ")"
	}
	if !c.inside(real) {
		allowed := c.dir
		if len(c.roots) > 1 {
			allowed = strings.Join(c.roots, ", ")
		}
		return refuse("outside the directories a VMFile may read (%s)%s; a VMFile reads only files under its own directory unless you allow more: --allow-path %s",
			allowed, via, filepath.Dir(real))
	}
	st, err := os.Stat(real)
	if err != nil {
		return fmt.Errorf("%s: %s %s: %w", where, node, *p, err)
	}
	if !st.Mode().IsRegular() {
		return refuse("not a regular file%s", via)
	}
	if u != useLocal && !c.secrets[real] {
		what, err := secretIn(real)
		if err != nil {
			return fmt.Errorf("%s: %s %s: %w", where, node, *p, err)
		}
		if what != "" {
			dest := "the VM's spec, which every reader of the events sees"
			if u == useGuest {
				dest = "the guest"
			}
			return refuse("looks like a secret (it holds %s)%s and would be copied into %s; if that is really meant: --allow-secret %s",
				what, via, dest, real)
		}
	}
	*p = real
	return nil
}

func (c checker) inside(p string) bool {
	for _, r := range c.roots {
		rel, err := filepath.Rel(r, p)
		if err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) && !filepath.IsAbs(rel) {
			return true
		}
	}
	return false
}

// secretMarks are what makes a file look like a secret, with what to
// call each.
var secretMarks = []struct {
	re   *regexp.Regexp
	what string
}{
	{regexp.MustCompile(`-----BEGIN NATS USER JWT-----`), "NATS user credentials"},
	{regexp.MustCompile(`-----BEGIN [A-Z0-9 ]*NKEY SEED-----`), "an nkey seed"},
	{regexp.MustCompile(`-----BEGIN OPENSSH PRIVATE KEY-----`), "an OpenSSH private key"},
	{regexp.MustCompile(`-----BEGIN [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----`), "a PEM private key"},
	// An nkey seed: S, a role (user, operator, account, server, cluster,
	// curve), 56 more base32 characters.
	{regexp.MustCompile(`(?:^|[^A-Z2-7])S[UOANCX][A-Z2-7]{56}(?:[^A-Z2-7]|$)`), "an nkey seed"},
}

// secretWindow is how much of a file is scanned at once; marks are
// searched across chunk boundaries with an overlap of secretOverlap.
const (
	secretWindow  = 256 << 10
	secretOverlap = 128
)

// secretIn scans the whole file for what secretMarks describe and
// returns the first one's name ("" if none).
func secretIn(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return LooksSecret(f)
}

// LooksSecret reads r to its end and says what secret it holds, if
// any: "NATS user credentials", "an nkey seed", "an OpenSSH private key"
// or "a PEM private key"; "" if none.
func LooksSecret(r io.Reader) (string, error) {
	buf := make([]byte, 0, secretWindow+secretOverlap)
	chunk := make([]byte, secretWindow)
	for {
		n, err := io.ReadFull(r, chunk)
		buf = append(buf, chunk[:n]...)
		for _, m := range secretMarks {
			if m.re.Match(buf) {
				return m.what, nil
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return "", nil
		}
		if err != nil {
			return "", err
		}
		if len(buf) > secretOverlap {
			keep := bytes.Clone(buf[len(buf)-secretOverlap:])
			buf = append(buf[:0], keep...)
		}
	}
}

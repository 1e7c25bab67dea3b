package provision

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"sync"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"

	"github.com/vmherd/vmherd/internal/vmfile"
)

// StepError is the first step that failed.
type StepError struct {
	Index    int // from 1
	Step     vmfile.Step
	ExitCode int // -1: not a command's exit (a copy, a lost connection)
	Err      error
	Tail     string // the end of its output
}

func (e *StepError) Error() string {
	what := fmt.Sprintf("provision step %d (%s) failed", e.Index, e.Step.Describe())
	if e.ExitCode >= 0 {
		what += fmt.Sprintf(" with exit code %d", e.ExitCode)
	} else {
		what += ": " + e.Err.Error()
	}
	if e.Tail != "" {
		what += "; its last output:\n" + e.Tail
	}
	return what
}

func (e *StepError) Unwrap() error { return e.Err }

// tail keeps the last n bytes written to it.
type tail struct {
	n int
	b []byte
}

func (t *tail) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if len(t.b) > t.n {
		t.b = t.b[len(t.b)-t.n:]
	}
	return len(p), nil
}

// lockedWriter serializes writes.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// tailBytes is how much of a failing step's output its error shows.
const tailBytes = 2048

// Run runs steps in order on the guest behind client, streaming each
// step's output to out and to log (with a header per step), and stops at
// the first that fails. Files are copied with SFTP, keeping the source
// file's permission bits.
func Run(ctx context.Context, client *ssh.Client, steps []vmfile.Step, out, log io.Writer) error {
	var fc *sftp.Client
	defer func() {
		if fc != nil {
			_ = fc.Close()
		}
	}()
	files := func() (*sftp.Client, error) {
		if fc == nil {
			c, err := sftp.NewClient(client)
			if err != nil {
				return nil, fmt.Errorf("starting sftp: %w", err)
			}
			fc = c
		}
		return fc, nil
	}
	for i, s := range steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		fmt.Fprintf(log, "==> step %d/%d: %s\n", i+1, len(steps), s.Describe())
		fmt.Fprintf(out, "==> step %d/%d: %s\n", i+1, len(steps), s.Describe())
		t := &tail{n: tailBytes}
		// One writer for the command's stdout and stderr, which arrive
		// on two goroutines.
		w := &lockedWriter{w: io.MultiWriter(out, log, t)}
		var err error
		code := -1
		switch {
		case s.Kind == "file":
			var c *sftp.Client
			if c, err = files(); err == nil {
				err = copyFile(c, s.Source, s.Destination)
			}
		case s.Script != "":
			var c *sftp.Client
			if c, err = files(); err == nil {
				remote := fmt.Sprintf("/tmp/vmherd-provision-%d.sh", i+1)
				if err = copyFile(c, s.Script, remote); err == nil {
					code, err = run(ctx, client, "/bin/sh "+remote, w)
					_ = c.Remove(remote)
				}
			}
		default:
			code, err = run(ctx, client, s.Inline, w)
		}
		if err != nil {
			fmt.Fprintf(log, "==> step %d failed: %v\n", i+1, err)
			return &StepError{Index: i + 1, Step: s, ExitCode: code, Err: err, Tail: strings.TrimRight(string(t.b), "\n")}
		}
	}
	fmt.Fprintf(log, "==> %d steps done\n", len(steps))
	return nil
}

// run runs cmd in a session; code is its exit status (-1 if it has none).
func run(ctx context.Context, client *ssh.Client, cmd string, w io.Writer) (int, error) {
	sess, err := client.NewSession()
	if err != nil {
		return -1, err
	}
	defer sess.Close()
	sess.Stdout, sess.Stderr = w, w
	done := make(chan error, 1)
	go func() { done <- sess.Run(cmd) }()
	select {
	case err = <-done:
	case <-ctx.Done():
		_ = sess.Signal(ssh.SIGTERM)
		return -1, ctx.Err()
	}
	var ee *ssh.ExitError
	if errors.As(err, &ee) {
		return ee.ExitStatus(), err
	}
	if err != nil {
		return -1, err
	}
	return 0, nil
}

// copyFile copies local src to remote dst (making dst's directory),
// keeping src's permission bits.
func copyFile(c *sftp.Client, src, dst string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if err := c.MkdirAll(path.Dir(dst)); err != nil {
		return fmt.Errorf("making %s: %w", path.Dir(dst), err)
	}
	rf, err := c.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC)
	if err != nil {
		return fmt.Errorf("creating %s: %w", dst, err)
	}
	if _, err := io.Copy(rf, f); err != nil {
		rf.Close()
		return fmt.Errorf("copying to %s: %w", dst, err)
	}
	if err := rf.Close(); err != nil {
		return err
	}
	if err := c.Chmod(dst, st.Mode().Perm()); err != nil {
		return fmt.Errorf("setting %s's mode: %w", dst, err)
	}
	return nil
}

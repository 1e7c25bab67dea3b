package vmctl

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/vmherd/vmherd/internal/vm"
)

// DetachKey ends a console session: Ctrl-].
const DetachKey = 0x1d

func (g *globals) consoleEndpoint(ctx context.Context, name string) (vm.ConsoleEndpoint, error) {
	r, err := g.record(ctx, name)
	if err != nil {
		return vm.ConsoleEndpoint{}, err
	}
	var ep vm.ConsoleEndpoint
	if err := g.query(ctx, r, "console_endpoint", &ep); err != nil {
		return ep, err
	}
	return ep, nil
}

func (g *globals) consoleCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "console NAME",
		Short:             "attach this terminal to the VM's serial console (detach with Ctrl-])",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			ep, err := g.consoleEndpoint(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			conn, err := dialConsole(cmd.Context(), ep)
			if err != nil {
				return err
			}
			defer conn.Close()
			fmt.Fprintf(g.errOut, "connected to %s's console; detach with Ctrl-]\r\n", args[0])
			if f := os.Stdin; term.IsTerminal(int(f.Fd())) {
				old, err := term.MakeRaw(int(f.Fd()))
				if err == nil {
					defer func() { _ = term.Restore(int(f.Fd()), old) }()
				}
			}
			return attach(conn, os.Stdin, g.out)
		},
	}
}

// attach copies the console to out and in to the console until the detach
// key is typed, in reaches EOF, or the console closes.
func attach(conn io.ReadWriteCloser, in io.Reader, out io.Writer) error {
	done := make(chan error, 2)
	go func() {
		_, err := io.Copy(out, conn)
		done <- err
	}()
	go func() {
		buf := make([]byte, 1024)
		for {
			n, err := in.Read(buf)
			if n > 0 {
				chunk := buf[:n]
				if i := bytes.IndexByte(chunk, DetachKey); i >= 0 {
					_, _ = conn.Write(chunk[:i])
					done <- nil
					return
				}
				if _, werr := conn.Write(chunk); werr != nil {
					done <- werr
					return
				}
			}
			if err != nil {
				done <- nil
				return
			}
		}
	}()
	err := <-done
	_ = conn.Close()
	return err
}

func dialConsole(ctx context.Context, ep vm.ConsoleEndpoint) (io.ReadWriteCloser, error) {
	switch ep.Kind {
	case vm.ConsoleUnixSocket:
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", ep.Path)
		if err != nil {
			return nil, fmt.Errorf("connecting to the console socket %s: %w (vmctl console must run on the VM's host)", ep.Path, err)
		}
		return c, nil
	case vm.ConsoleWebSocket:
		return dialWebSocketConsole(ctx, ep)
	default:
		return nil, fmt.Errorf("this VM has no console (backend console kind %q)", ep.Kind)
	}
}

func (g *globals) logCmd() *cobra.Command {
	var follow bool
	var tail int
	c := &cobra.Command{
		Use:               "log NAME",
		Short:             "print the VM's console log (-f: keep printing what the guest writes)",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			if tail < -1 {
				return usageError("--tail %d: give a number of lines, or -1 for all", tail)
			}
			ep, err := g.consoleEndpoint(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printConsoleLog(cmd.Context(), ep, g.out, tail, follow)
		},
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output until interrupted")
	c.Flags().IntVarP(&tail, "tail", "n", -1, "print only the last N lines first (-1: all)")
	return c
}

// followEvery is how often a followed log is polled for new output.
const followEvery = 200 * time.Millisecond

func printConsoleLog(ctx context.Context, ep vm.ConsoleEndpoint, out io.Writer, tail int, follow bool) error {
	switch {
	case ep.LogPath != "":
		return printLogFile(ctx, ep.LogPath, out, tail, follow)
	case ep.Kind == vm.ConsoleWebSocket:
		var buf bytes.Buffer
		next, err := printWebSocketHistory(ctx, ep, &buf, 0)
		if err != nil {
			return err
		}
		if _, err := out.Write(lastLines(buf.Bytes(), tail)); err != nil || !follow {
			return err
		}
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(followEvery):
			}
			if next, err = printWebSocketHistory(ctx, ep, out, next); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
		}
	}
	return fmt.Errorf("this VM keeps no console log (console kind %q)", ep.Kind)
}

// printLogFile prints a log file (its last tail lines when tail >= 0) and,
// with follow, what is appended to it until ctx ends. A file that shrinks
// (rotated or truncated) is read again from its start.
func printLogFile(ctx context.Context, path string, out io.Writer, tail int, follow bool) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("reading the console log: %w (vmctl log must run on the VM's host)", err)
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		return fmt.Errorf("reading the console log: %w", err)
	}
	if _, err := out.Write(lastLines(b, tail)); err != nil || !follow {
		return err
	}
	off := int64(len(b))
	buf := make([]byte, 64<<10)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(followEvery):
		}
		fi, err := f.Stat()
		if err != nil {
			return fmt.Errorf("following the console log: %w", err)
		}
		if fi.Size() < off {
			off = 0
		}
		for off < fi.Size() {
			n, err := f.ReadAt(buf, off)
			if n > 0 {
				if _, werr := out.Write(buf[:n]); werr != nil {
					return werr
				}
				off += int64(n)
			}
			if err != nil {
				break
			}
		}
	}
}

// lastLines returns the last n lines of b (all of b when n < 0).
func lastLines(b []byte, n int) []byte {
	if n < 0 {
		return b
	}
	end := len(b)
	if end > 0 && b[end-1] == '\n' {
		end--
	}
	i := end
	for ; n > 0 && i > 0; n-- {
		j := bytes.LastIndexByte(b[:i], '\n')
		if j < 0 {
			return b
		}
		i = j
		if n == 1 {
			return b[i+1:]
		}
	}
	if n > 0 {
		return b
	}
	return b[len(b):]
}

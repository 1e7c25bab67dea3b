package vmctl

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"

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
		Use:   "console NAME",
		Short: "attach this terminal to the VM's serial console (detach with Ctrl-])",
		Args:  cobra.ExactArgs(1),
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
	return &cobra.Command{
		Use:   "log NAME",
		Short: "print the VM's console log",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ep, err := g.consoleEndpoint(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printConsoleLog(cmd.Context(), ep, g.out)
		},
	}
}

func printConsoleLog(ctx context.Context, ep vm.ConsoleEndpoint, out io.Writer) error {
	switch {
	case ep.LogPath != "":
		f, err := os.Open(ep.LogPath)
		if err != nil {
			return fmt.Errorf("reading the console log: %w (vmctl log must run on the VM's host)", err)
		}
		defer f.Close()
		_, err = io.Copy(out, f)
		return err
	case ep.Kind == vm.ConsoleWebSocket:
		return printWebSocketHistory(ctx, ep, out)
	}
	return fmt.Errorf("this VM keeps no console log (console kind %q)", ep.Kind)
}

package vmctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/vmherd/vmherd/internal/relay"
)

// DetachKey ends a console session: Ctrl-].
const DetachKey = 0x1d

// relayHost is the host whose worker relays the VM's console, log and
// tunnels.
func (g *globals) relayHost(ctx context.Context, name string) (string, error) {
	r, err := g.record(ctx, name)
	if err != nil {
		return "", err
	}
	switch {
	case r.Destroyed():
		return "", &exitError{code: ExitFailed, kind: "not_found", msg: fmt.Sprintf("%s was destroyed; its console, log and guest went with it", name)}
	case r.Host == "":
		return "", &exitError{code: ExitFailed, msg: fmt.Sprintf("%s is not placed on a host yet", name)}
	}
	return r.Host, nil
}

// noJSON refuses --json for a command whose output is the guest's own
// (a terminal session, a byte stream): there is no document to print.
func (g *globals) noJSON(cmd *cobra.Command) error {
	if g.json {
		return usageError("%s prints what the guest sends, not a document: drop --json", cmd.CommandPath())
	}
	return nil
}

func (g *globals) consoleCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "console NAME",
		Short:             "attach this terminal to the VM's serial console, from any machine on the bus (detach with Ctrl-])",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.noJSON(cmd); err != nil {
				return err
			}
			host, err := g.relayHost(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			conn, err := g.c.Console(cmd.Context(), args[0])
			if err != nil {
				return g.commandErr(err)
			}
			defer conn.Close()
			fmt.Fprintf(g.errOut, "connected to %s's console (host %s); detach with Ctrl-]\r\n", args[0], host)
			if f := os.Stdin; term.IsTerminal(int(f.Fd())) {
				old, err := term.MakeRaw(int(f.Fd()))
				if err == nil {
					defer func() { _ = term.Restore(int(f.Fd()), old) }()
				}
			}
			err = attach(conn, os.Stdin, g.out)
			var closed *client.ConsoleClosedError
			if errors.As(err, &closed) {
				fmt.Fprintf(g.errOut, "\r\nvmctl: %s\r\n", closed.Reason)
				return nil
			}
			return err
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

func (g *globals) logCmd() *cobra.Command {
	var follow, prov bool
	var tail int
	c := &cobra.Command{
		Use:               "log NAME",
		Short:             "print the VM's console log, from any machine on the bus (-f: keep printing what the guest writes)",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			if tail < -1 {
				return usageError("--tail %d: give a number of lines, or -1 for all", tail)
			}
			if prov {
				return g.printProvisionLog(cmd.Context(), args[0], tail)
			}
			host, err := g.relayHost(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if g.json {
				// One document: the log's text.
				if follow {
					return usageError("log --follow prints the guest's output as it comes: drop --json (or --follow)")
				}
				var b strings.Builder
				if err := g.c.Log(cmd.Context(), args[0], &b, tail, false, nil); err != nil {
					return g.commandErr(err)
				}
				return g.printJSON(map[string]any{"vm": args[0], "host": host, "log": b.String()})
			}
			p := g.newProgress("log " + args[0])
			p.waitingFor("the console log")
			return g.commandErr(g.c.Log(cmd.Context(), args[0], g.out, tail, follow, func(err error) {
				if err != nil {
					p.trouble(err.Error())
				} else {
					p.trouble("")
				}
			}))
		},
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output until interrupted")
	c.Flags().IntVarP(&tail, "tail", "n", -1, "print only the last N lines first (-1: all)")
	c.Flags().BoolVar(&prov, "provision", false, "print the log of the VM's last provisioning (vmctl up/provision) instead")
	return c
}

// printProvisionLog prints what VM_SSH keeps of the VM's last provisioning.
func (g *globals) printProvisionLog(ctx context.Context, name string, tail int) error {
	kv, err := g.sshKV(ctx)
	if err != nil {
		return err
	}
	r, err := g.existing(ctx, name)
	if err != nil {
		return err
	}
	if r == nil {
		return &exitError{code: ExitFailed, msg: fmt.Sprintf("%s does not exist; a destroyed VM's provisioning log is deleted with it", name)}
	}
	e, err := kv.Get(ctx, api.SSHKey(name, r.Generation, api.SSHProvisionLog))
	if err != nil {
		return &exitError{code: ExitFailed, msg: fmt.Sprintf("%s has no provisioning log (vmctl up or vmctl provision writes one)", name)}
	}
	_, err = g.out.Write(relay.LastLines(e.Value(), tail))
	return err
}

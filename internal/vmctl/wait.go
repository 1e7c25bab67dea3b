package vmctl

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"
	"github.com/vmherd/vmherd/internal/fsm"
)

// waitDoc is what `vmctl wait --json` prints.
type waitDoc struct {
	VM     string        `json:"vm"`
	For    string        `json:"for"`
	Record *api.VmRecord `json:"record,omitempty"`
	// Banner is the SSH server's greeting (--for ssh).
	Banner string `json:"banner,omitempty"`
	// Command is the command's outcome (--for command=ID).
	Command *sent      `json:"command,omitempty"`
	Error   *errorJSON `json:"error,omitempty"`
}

func (g *globals) waitCmd() *cobra.Command {
	var what string
	c := &cobra.Command{
		Use:   "wait NAME --for state=STATE|ssh|command=ID",
		Short: "wait until a VM is in a state, its guest's SSH server answers, or a command has ended",
		Long: `wait blocks until the condition holds, then exits 0:

  --for state=running     the record says running, with no command in flight
                          (state=destroyed also holds for a VM with no record)
  --for ssh               an SSH server greets through the tunnel to the
                          guest's port 22 (from any machine on the bus)
  --for command=ID        the command with that id (printed by --no-wait)
                          has its result; a rejected or failed one exits 1

It gives up after --timeout (exit 3), and exits 1 at once when the
condition cannot hold any more (the VM was destroyed, does not exist).`,
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			kind, arg, _ := strings.Cut(what, "=")
			switch {
			case kind == "state" && slices.Contains(fsm.States(), api.VmState(arg)):
			case kind == "state":
				return usageError("--for state=%s: not a state (%s)", arg, joinStates(fsm.States()))
			case kind == "ssh" && arg == "":
			case kind == "command" && arg != "":
			default:
				return usageError("--for %q: want state=STATE, ssh or command=ID", what)
			}
			if err := g.conn(); err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			doc := waitDoc{VM: args[0], For: what}
			err := g.wait(ctx, &doc, kind, arg)
			if err != nil {
				var te *client.TimeoutError
				switch {
				case cmd.Context().Err() != nil:
					err = &exitError{code: ExitInterrupted, kind: "interrupted", msg: "interrupted", err: err}
				case errors.As(err, &te) || errors.Is(err, context.DeadlineExceeded):
					err = &exitError{code: ExitNoResult, kind: "timeout", msg: fmt.Sprintf("%s: not %s within --timeout %s (%v)", args[0], what, g.timeout, err), err: err}
				case errors.Is(err, client.ErrNeverState):
					err = &exitError{code: ExitFailed, kind: "never", msg: fmt.Sprintf("%s: waiting for %s: %v", args[0], what, err), err: err}
				default:
					err = g.commandErr(err)
				}
			}
			if g.json {
				if err != nil {
					var ee *exitError
					if errors.As(err, &ee) {
						doc.Error = errorDoc(ee)
					}
				}
				if perr := g.printJSON(doc); perr != nil {
					return perr
				}
			}
			return err
		},
	}
	c.Flags().StringVar(&what, "for", "", "state=STATE, ssh or command=ID")
	_ = c.MarkFlagRequired("for")
	return c
}

func (g *globals) wait(ctx context.Context, doc *waitDoc, kind, arg string) error {
	name := doc.VM
	p := g.newProgress("wait " + name)
	defer p.clear()
	switch kind {
	case "state":
		p.waitingFor("state " + arg)
		r, err := g.c.WaitState(ctx, name, api.VmState(arg))
		doc.Record = r
		if err == nil {
			g.printf("%s is %s\n", name, arg)
		}
		return err
	case "ssh":
		p.waitingFor("its SSH server")
		banner, err := g.c.WaitSSH(ctx, name)
		if err != nil {
			return err
		}
		doc.Banner = banner
		doc.Record, _ = g.c.Record(ctx, name)
		g.printf("%s: SSH answers (%s)\n", name, banner)
		return nil
	}
	p.waitingFor("command " + arg)
	res, err := g.c.WaitCommand(ctx, name, arg)
	final := (*api.Event)(nil)
	if res != nil {
		final, doc.Record = res.Final, res.Record
	}
	var rej *client.RejectedError
	var failed *client.FailedError
	switch {
	case errors.As(err, &rej):
		final = rej.Event
	case errors.As(err, &failed):
		final = failed.Event
	}
	if final != nil {
		p.clear()
		g.printEvent(final)
		doc.Command = &sent{Action: final.Action, CommandID: arg, Result: final.Type, Event: final}
		if res != nil {
			doc.Command.Seq = res.Seq
		}
	}
	return err
}

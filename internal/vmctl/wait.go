package vmctl

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

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
					err = &exitError{code: ExitNoResult, kind: "timeout", msg: fmt.Sprintf("%s: not %s within --timeout %s%s", args[0], what, g.timeout, g.waitedFor(cmd.Context(), &doc, kind, te)), err: err}
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

// waitedFor says where a wait that timed out had got to.
func (g *globals) waitedFor(ctx context.Context, doc *waitDoc, kind string, te *client.TimeoutError) string {
	switch {
	case kind == "command" && te != nil && te.Accepted:
		return fmt.Sprintf(": accepted on host %s, no result yet", te.Host)
	case kind == "command":
		return ": no decision of that command is stored (was it sent under that id? does an engine run?)"
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	r, err := g.c.Record(rctx, doc.VM)
	switch {
	case err != nil:
		return ""
	case kind == "ssh" && !running(r):
		doc.Record = r
		return fmt.Sprintf(": it is %s, not running", r.State)
	case kind == "ssh":
		doc.Record = r
		return ": it runs, and nothing greets on its port 22 (still booting? no SSH server? no network?)"
	}
	doc.Record = r
	return fmt.Sprintf(": it is %s", r.State)
}

// watchTrouble says, until stop is closed, why a wait that polls (state,
// ssh) may be long: the NATS connection is down, or no engine takes
// commands (nothing changes a record then). It returns when it has
// stopped writing.
func (g *globals) watchTrouble(ctx context.Context, p *progress, stop <-chan struct{}) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			why := ""
			if down := g.c.DownSince(); !down.IsZero() {
				why = fmt.Sprintf("the connection to NATS is down since %s; reconnecting", down.Format("15:04:05"))
			} else if ok, reason, err := g.c.EngineServing(ctx, 0); err == nil && !ok {
				why = reason
			}
			select {
			case <-stop:
				return
			default:
			}
			p.trouble(why)
			p.show()
		}
	}()
	return done
}

func (g *globals) wait(ctx context.Context, doc *waitDoc, kind, arg string) error {
	name := doc.VM
	p := g.newProgress("wait " + name)
	defer p.clear()
	switch kind {
	case "state":
		p.waitingFor("state " + arg)
	case "ssh":
		p.waitingFor("its SSH server")
	default:
		p.waitingFor("command " + arg)
	}
	if kind != "command" {
		// The watcher alone writes p from here until it is stopped.
		stop := make(chan struct{})
		done := g.watchTrouble(ctx, p, stop)
		defer func() { close(stop); <-done }()
	}
	switch kind {
	case "state":
		r, err := g.c.WaitState(ctx, name, api.VmState(arg))
		doc.Record = r
		if err == nil {
			g.printf("%s is %s\n", name, arg)
		}
		return err
	case "ssh":
		banner, err := g.c.WaitSSH(ctx, name)
		if err != nil {
			return err
		}
		doc.Banner = banner
		doc.Record, _ = g.c.Record(ctx, name)
		g.printf("%s: SSH answers (%s)\n", name, banner)
		return nil
	}
	res, err := g.c.WaitCommand(ctx, name, arg, client.WithProgress(func(pr client.Progress) {
		switch pr.Waiting {
		case "decision":
			p.waitingFor("the engine's decision on command " + arg)
		case "result":
			p.waitingFor(fmt.Sprintf("the result of command %s from the worker on host %s", arg, pr.Host))
		case "copy":
			p.waitingFor(fmt.Sprintf("the copy to the destination (%d of %d MiB)", pr.Bytes>>20, pr.Total>>20))
		}
		p.trouble(pr.Trouble)
		p.show()
	}))
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

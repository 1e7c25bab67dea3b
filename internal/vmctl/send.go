package vmctl

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"
)

// sent is one command's outcome as `--json` prints it.
type sent struct {
	Action    api.Action `json:"action"`
	CommandID string     `json:"command_id,omitempty"`
	// CommandSeq is the command's sequence in VM_COMMANDS.
	CommandSeq uint64 `json:"command_seq,omitempty"`
	// Result is the type of the event that ended it ("" with --no-wait:
	// stored, not waited for), Seq that event's stream sequence.
	Result api.EventType `json:"result,omitempty"`
	Seq    uint64        `json:"seq,omitempty"`
	Event  *api.Event    `json:"event,omitempty"`
	// Skipped says why nothing was sent (--if-not-exists and friends).
	Skipped string `json:"skipped,omitempty"`
}

// commandsDoc is what a lifecycle command prints under --json: one
// document, whatever the number of commands it sent (create --start sends
// two), with the VM's record as it stands after them.
type commandsDoc struct {
	VM       string        `json:"vm"`
	Commands []sent        `json:"commands"`
	Record   *api.VmRecord `json:"record,omitempty"`
	// Error is why the last command did not succeed (the exit code says
	// the same).
	Error *errorJSON `json:"error,omitempty"`
}

// lifecycle sends commands one after the other (each only once the one
// before succeeded), printing as it goes, and the JSON document at the
// end (also when one fails: the error follows it).
type lifecycle struct {
	g   *globals
	doc commandsDoc
}

func (g *globals) newLifecycle(name string) *lifecycle {
	return &lifecycle{g: g, doc: commandsDoc{VM: name, Commands: []sent{}}}
}

// done prints the JSON document, with err (what the last command
// ended in) in it, and returns err.
func (l *lifecycle) done(ctx context.Context, err error) error {
	if !l.g.json {
		return err
	}
	if l.doc.Record == nil && l.g.c != nil {
		l.doc.Record, _ = l.g.c.Record(ctx, l.doc.VM)
	}
	if err != nil {
		var ee *exitError
		if !errors.As(err, &ee) {
			ee = &exitError{code: ExitFailed, kind: "error", msg: err.Error(), err: err}
		}
		if ee.kind == "" {
			ee.kind = "error"
		}
		l.doc.Error = errorDoc(ee)
	}
	return errors.Join(l.g.printJSON(l.doc), err)
}

// skip records a command not sent, and why.
func (l *lifecycle) skip(action api.Action, why string) {
	l.g.printf("%s %s: %s\n", action, l.doc.VM, why)
	l.doc.Commands = append(l.doc.Commands, sent{Action: action, Skipped: why})
}

// send publishes a command and, unless --no-wait, waits for its result,
// showing what it waits for. It returns the final event (nil with
// --no-wait).
func (l *lifecycle) send(ctx context.Context, action api.Action, cmd api.Command) (*api.Event, error) {
	g, name := l.g, l.doc.VM
	if err := api.ValidateName(name); err != nil {
		return nil, usageError("NAME %q: %s", name, ruleOf(err))
	}
	if err := g.conn(); err != nil {
		return nil, err
	}
	if cmd.CommandID == "" {
		cmd.CommandID = "vmctl-" + strings.TrimPrefix(client.NewCommandID(), "c-")
	}
	if g.noWait {
		s, err := g.c.Send(ctx, name, action, cmd)
		if err != nil {
			return nil, g.commandErr(err)
		}
		if s.NoEngine != "" {
			fmt.Fprintf(g.errOut, "vmctl: warning: %s; the command is stored and will be applied when an engine starts\n", s.NoEngine)
		}
		g.printf("%s %s: stored as command %s (seq %d)\n", action, name, s.CommandID, s.Seq)
		l.doc.Commands = append(l.doc.Commands, sent{Action: action, CommandID: s.CommandID, CommandSeq: s.Seq})
		return nil, nil
	}
	wctx, cancel := context.WithTimeout(ctx, g.timeout)
	defer cancel()
	p := g.newProgress(fmt.Sprintf("%s %s", action, name))
	defer p.clear()
	decided := false
	res, err := g.c.Do(wctx, name, action, cmd, client.WithProgress(func(pr client.Progress) {
		switch pr.Waiting {
		case "decision":
			p.waitingFor("the engine's decision")
		case "result":
			if !decided {
				decided = true
				p.clear()
				g.printf("%s %s: accepted on host %s (%s)\n", action, name, pr.Host, action.Pending())
			}
			p.waitingFor(fmt.Sprintf("the result from the worker on host %s", pr.Host))
		case "copy":
			p.waitingFor(fmt.Sprintf("the copy to the destination (%d of %d MiB)", pr.Bytes>>20, pr.Total>>20))
		}
		p.trouble(pr.Trouble)
		p.show()
	}))
	p.clear()
	var final *api.Event
	if res != nil {
		final = res.Final
		l.doc.Record = res.Record
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
		g.printEvent(final)
		s := sent{Action: action, CommandID: final.CommandID, Result: final.Type, Event: final}
		if res != nil {
			s.Seq = res.Seq
		}
		l.doc.Commands = append(l.doc.Commands, s)
	}
	var te *client.TimeoutError
	if errors.As(err, &te) && ctx.Err() != nil {
		return final, &exitError{code: ExitInterrupted, kind: "interrupted", msg: "interrupted: " + stillCarriedOut(te), err: err}
	}
	if err != nil {
		return final, g.commandErr(err)
	}
	return final, nil
}

// stillCarriedOut says what becomes of a command vmctl stopped waiting for.
func stillCarriedOut(te *client.TimeoutError) string {
	if te.Accepted {
		return fmt.Sprintf("%s %s was accepted (command %s) and will still be carried out; %s", te.Action, te.VM, te.CommandID, watchHint(te.VM))
	}
	return fmt.Sprintf("%s %s is stored as command %s and will still be decided; %s", te.Action, te.VM, te.CommandID, watchHint(te.VM))
}

// commandErr turns the client's typed errors into vmctl's exit codes and
// messages in the user's words (flags, not wire fields).
func (g *globals) commandErr(err error) error {
	var (
		rej    *client.RejectedError
		failed *client.FailedError
		te     *client.TimeoutError
		ne     *client.NoEngineError
		fe     *api.FieldError
	)
	switch {
	case errors.As(err, &rej) && rej.NoSuchVM:
		return &exitError{code: ExitFailed, kind: "rejected", msg: fmt.Sprintf("no VM named %s (`vmctl list` shows the VMs; create one with `vmctl create %s`); the engine rejected %s: %s", rej.VM, rej.VM, rej.Action, flagWords(rej.Reason)), err: err}
	case errors.As(err, &rej):
		return &exitError{code: ExitFailed, kind: "rejected", msg: fmt.Sprintf("%s %s rejected: %s", rej.Action, rej.VM, flagWords(rej.Reason)), err: err}
	case errors.As(err, &failed):
		return &exitError{code: ExitFailed, kind: "failed", msg: fmt.Sprintf("%s %s failed: %s", failed.Action, failed.VM, flagWords(failed.Message)), err: err}
	case errors.As(err, &te):
		return &exitError{code: ExitNoResult, kind: "timeout", msg: fmt.Sprintf("no result within --timeout %s: %s", g.timeout, stillCarriedOut(te)), err: err}
	case errors.As(err, &ne) && ne.Stored:
		return &exitError{code: ExitNoResult, kind: "no_engine", msg: fmt.Sprintf("%s; %s once an engine runs", ne.Reason, stillCarriedOut(&client.TimeoutError{VM: ne.VM, Action: ne.Action, CommandID: ne.CommandID})), err: err}
	case errors.As(err, &ne):
		return &exitError{code: ExitNoResult, kind: "no_engine", msg: ne.Error() + ".\nhelp: start the engine (`engine --with-worker`), or send with --no-wait to store the command for when an engine starts", err: err}
	case errors.As(err, &fe):
		return &exitError{code: ExitUsage, kind: "usage", msg: flagWords(err.Error()), err: err}
	}
	return err
}

// recordLag bounds how long a wait for a record to show a result lasts.
const recordLag = 5 * time.Second

// send sends one command for a caller that prints its own summary (drain,
// up): progress and text lines as a lifecycle command shows them, no JSON
// document of its own.
func (g *globals) send(ctx context.Context, name string, action api.Action, cmd api.Command) (*api.Event, error) {
	return g.newLifecycle(name).send(ctx, action, cmd)
}

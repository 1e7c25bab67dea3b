// Package vmctl is the user's command-line client: it publishes lifecycle
// commands, waits for their result events, and reads records and events.
package vmctl

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/vm"
)

// globals are the connection and output flags every subcommand shares.
type globals struct {
	server  string
	creds   string
	prefix  string
	json    bool
	noWait  bool
	timeout time.Duration

	out, errOut io.Writer
	nc          *nats.Conn
	js          jetstream.JetStream
	names       events.Names
}

// exitError carries an exit code without printing usage.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

// Main runs vmctl with args and returns the exit code.
func Main(args []string, out, errOut io.Writer) int {
	g := &globals{out: out, errOut: errOut}
	root := &cobra.Command{
		Use:   "vmctl",
		Short: "vmherd's command-line client",
		Long: `vmctl publishes lifecycle commands to vmherd over NATS and waits for their
result events. It connects like the nats CLI: --server, else NATS_URL, else
nats://127.0.0.1:4222.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return g.connect()
		},
		PersistentPostRun: func(*cobra.Command, []string) {
			if g.nc != nil {
				g.nc.Close()
			}
		},
	}
	def := os.Getenv("NATS_URL")
	if def == "" {
		def = "nats://127.0.0.1:4222"
	}
	pf := root.PersistentFlags()
	pf.StringVarP(&g.server, "server", "s", def, "NATS server URL (env NATS_URL)")
	pf.StringVar(&g.creds, "creds", os.Getenv("NATS_CREDS"), "NATS credentials file (env NATS_CREDS)")
	pf.StringVar(&g.prefix, "prefix", events.DefaultPrefix, "subject prefix of the vmherd installation")
	pf.BoolVar(&g.json, "json", false, "print JSON for scripts")
	pf.BoolVar(&g.noWait, "no-wait", false, "return once the command is stored, without waiting for its result")
	pf.DurationVar(&g.timeout, "timeout", 5*time.Minute, "how long to wait for a result")

	root.AddCommand(
		g.createCmd(),
		g.lifecycleCmd("start", "start a prepared or stopped VM"),
		g.stopCmd(),
		g.lifecycleCmd("suspend", "pause a running VM"),
		g.lifecycleCmd("resume", "continue a suspended VM"),
		g.lifecycleCmd("destroy", "stop a VM and remove everything it has on its host"),
		g.listCmd(),
		g.statusCmd(),
		g.ipCmd(),
		g.eventsCmd(),
		g.historyCmd(),
		g.consoleCmd(),
		g.logCmd(),
	)
	root.SetArgs(args)
	root.SetOut(out)
	root.SetErr(errOut)
	if err := root.Execute(); err != nil {
		var ee *exitError
		if errors.As(err, &ee) {
			if ee.msg != "" {
				fmt.Fprintln(errOut, "vmctl:", ee.msg)
			}
			return ee.code
		}
		fmt.Fprintln(errOut, "vmctl:", err)
		return 1
	}
	return 0
}

func (g *globals) connect() error {
	g.names = events.Names{Prefix: g.prefix}
	opts := []nats.Option{nats.Name("vmctl"), nats.Timeout(5 * time.Second)}
	if g.creds != "" {
		opts = append(opts, nats.UserCredentials(g.creds))
	}
	nc, err := nats.Connect(g.server, opts...)
	if err != nil {
		return fmt.Errorf("connecting to %s: %w\nhelp: is the engine running? start it with `engine --with-worker`, or point --server/NATS_URL at your NATS", g.server, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return err
	}
	g.nc, g.js = nc, js
	return nil
}

func newCommandID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "vmctl-" + hex.EncodeToString(b[:])
}

// send publishes a command and, unless --no-wait, waits for its result.
// It returns the final event (the accepted one with --no-wait).
func (g *globals) send(ctx context.Context, name, action string, cmd events.Command) (*events.Event, error) {
	if err := vm.ValidateName(name); err != nil {
		return nil, &exitError{code: 2, msg: err.Error()}
	}
	if cmd.CommandID == "" {
		cmd.CommandID = newCommandID()
	}
	body, err := json.Marshal(cmd)
	if err != nil {
		return nil, err
	}
	// Read the VM's events from the stream, starting after its current end,
	// so that only stored events count: a core subscription can see an event
	// a moment before JetStream has stored it, and a next command sent on
	// that sight could be decided on the older state.
	st, err := g.js.Stream(ctx, g.names.EventsStream())
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w (is the engine running?)", g.names.EventsStream(), err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return nil, err
	}
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{g.names.VMEvents(name)},
		DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:    info.State.LastSeq + 1,
	})
	if err != nil {
		return nil, err
	}
	ack, err := g.js.Publish(ctx, g.names.Command(name, action), body, jetstream.WithMsgID(cmd.CommandID))
	if err != nil {
		return nil, fmt.Errorf("publishing %s for %s: %w", action, name, err)
	}
	if g.noWait {
		g.printf("%s %s: stored as command %s (seq %d)\n", action, name, cmd.CommandID, ack.Sequence)
		if g.json {
			return nil, g.printJSON(map[string]any{"vm": name, "action": action, "command_id": cmd.CommandID, "seq": ack.Sequence})
		}
		return nil, nil
	}
	wctx, cancel := context.WithTimeout(ctx, g.timeout)
	defer cancel()
	it, err := cons.Messages()
	if err != nil {
		return nil, err
	}
	defer it.Stop()
	stop := context.AfterFunc(wctx, it.Stop)
	defer stop()
	for {
		m, err := it.Next()
		if err != nil {
			if wctx.Err() != nil {
				err = wctx.Err()
			}
			return nil, &exitError{code: 3, msg: fmt.Sprintf("no result for %s %s (command %s) within %s: %v; `vmctl history %s` shows what happened", action, name, cmd.CommandID, g.timeout, err, name)}
		}
		ev, err := events.Decode(m.Data())
		if err != nil || ev.CommandID != cmd.CommandID {
			continue
		}
		switch {
		case ev.Type == events.TypeRejected:
			g.printEvent(ev)
			return ev, &exitError{code: 1, msg: fmt.Sprintf("%s %s rejected: %s", action, name, ev.Reason)}
		case ev.Type == events.TypeAccepted:
			if !g.json {
				g.printf("%s %s: accepted on host %s (%s)\n", action, name, ev.Host, ev.State)
			}
		case ev.Type == events.TypeFailed:
			g.printEvent(ev)
			return ev, &exitError{code: 1, msg: fmt.Sprintf("%s %s failed: %s", action, name, ev.Error)}
		case ev.Type.IsResult():
			g.printEvent(ev)
			return ev, nil
		}
	}
}

func (g *globals) printf(format string, args ...any) {
	if !g.json {
		fmt.Fprintf(g.out, format, args...)
	}
}

func (g *globals) printJSON(v any) error {
	enc := json.NewEncoder(g.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (g *globals) printEvent(ev *events.Event) {
	if g.json {
		_ = g.printJSON(ev)
		return
	}
	fmt.Fprintln(g.out, formatEvent(0, ev))
}

func formatEvent(seq uint64, ev *events.Event) string {
	s := ""
	if seq > 0 {
		s = fmt.Sprintf("%-6d ", seq)
	}
	s += fmt.Sprintf("%s %-10s %-9s %-8s %-10s %s", ev.Time.Format("15:04:05.000"), ev.VM, ev.Type, ev.Action, ev.State, ev.CommandID)
	if ev.Host != "" {
		s += " host=" + ev.Host
	}
	if ev.Reason != "" {
		s += " reason=" + fmt.Sprintf("%q", ev.Reason)
	}
	if ev.Error != "" {
		s += " error=" + fmt.Sprintf("%q", ev.Error)
	}
	return s
}

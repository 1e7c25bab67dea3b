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
	"os/signal"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/vmherd/vmherd/internal/credsfile"
	"github.com/vmherd/vmherd/internal/datadir"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/vm"
)

// Exit codes, as the README lists them.
const (
	ExitOK          = 0
	ExitFailed      = 1 // rejected, failed, or an error talking to NATS
	ExitUsage       = 2 // bad arguments
	ExitNoResult    = 3 // no engine is deciding commands, or no result within --timeout
	ExitInterrupted = 130
)

// Version is set at link time (-ldflags "-X ...vmctl.Version=v1.2.3");
// otherwise the module version and VCS revision from the build info are used.
var Version = ""

// globals are the connection and output flags every subcommand shares.
type globals struct {
	server   string
	creds    string
	issuer   string // the credentials' identity name, the commands' issuer token
	tlsCA    string
	prefix   string
	json     bool
	noWait   bool
	timeout  time.Duration
	progress string

	out, errOut io.Writer
	nc          *nats.Conn
	js          jetstream.JetStream
	mu          sync.Mutex
	records     jetstream.KeyValue // VM_RECORDS, once opened (under mu)
	names       events.Names
	// ran is set once flags and arguments parsed and a command began: an
	// error before that is a usage error.
	ran bool
}

// exitError carries an exit code without printing usage.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func usageError(format string, args ...any) error {
	return &exitError{code: ExitUsage, msg: fmt.Sprintf(format, args...)}
}

// Main runs vmctl with args and returns the exit code. SIGINT and SIGTERM
// cancel the command in progress.
func Main(args []string, out, errOut io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return Run(ctx, args, out, errOut)
}

// Run is Main under ctx: cancelling ctx is the user's Ctrl-C.
func Run(ctx context.Context, args []string, out, errOut io.Writer) int {
	g := &globals{out: out, errOut: errOut}
	root := &cobra.Command{
		Use:   "vmctl",
		Short: "vmherd's command-line client",
		Long: `vmctl publishes lifecycle commands to vmherd over NATS and waits for their
result events. It connects like the nats CLI: --server, else NATS_URL, else
nats://127.0.0.1:4222.

Exit codes: 0 done, 1 rejected or failed, 2 bad arguments, 3 no engine is
deciding commands or no result within --timeout, 130 interrupted.`,
		Version:       version(),
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(*cobra.Command, []string) error {
			g.ran = true
			g.names = events.Names{Prefix: g.prefix}
			return nil
		},
		PersistentPostRun: func(*cobra.Command, []string) {
			if g.nc != nil {
				g.nc.Close()
			}
		},
	}
	root.SetVersionTemplate("vmctl {{.Version}}\n")
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageError("%v\nRun '%s --help' for usage.", err, c.CommandPath())
	})
	def := os.Getenv("NATS_URL")
	if def == "" {
		def = "nats://127.0.0.1:4222"
	}
	pf := root.PersistentFlags()
	pf.StringVarP(&g.server, "server", "s", def, "NATS server URL (env NATS_URL)")
	pf.StringVar(&g.creds, "creds", os.Getenv("NATS_CREDS"), "NATS credentials file (env NATS_CREDS; default: the local engine's admin.creds when readable)")
	pf.StringVar(&g.tlsCA, "tls-ca", os.Getenv("NATS_CA"), "CA certificate(s) to verify a TLS server (PEM; env NATS_CA)")
	pf.StringVar(&g.prefix, "prefix", events.DefaultPrefix, "subject prefix of the vmherd installation")
	pf.BoolVar(&g.json, "json", false, "print JSON for scripts")
	pf.BoolVar(&g.noWait, "no-wait", false, "return once the command is stored, without waiting for its result")
	pf.DurationVar(&g.timeout, "timeout", 5*time.Minute, "how long to wait for a result")
	pf.StringVar(&g.progress, "progress", "auto", "show what vmctl waits for: auto (on a terminal), always or never")

	root.AddCommand(
		g.createCmd(),
		g.lifecycleCmd(fsm.ActStart, "start a prepared or stopped VM"),
		g.stopCmd(),
		g.lifecycleCmd(fsm.ActSuspend, "pause a running VM"),
		g.lifecycleCmd(fsm.ActResume, "continue a suspended VM"),
		g.destroyCmd(),
		g.purgeCmd(),
		g.migrateCmd(),
		g.listCmd(),
		g.statusCmd(),
		g.ipCmd(),
		g.eventsCmd(),
		g.historyCmd(),
		g.consoleCmd(),
		g.portForwardCmd(),
		g.proxyCmd(),
		g.sshCmd(),
		g.imageCmd(),
		g.upCmd(),
		g.downCmd(),
		g.reloadCmd(),
		g.provisionCmd(),
		g.logCmd(),
		g.hostsCmd(),
		g.hostCmd(),
	)
	root.SetArgs(args)
	root.SetOut(out)
	root.SetErr(errOut)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return ExitOK
	}
	var ee *exitError
	switch {
	case errors.As(err, &ee):
	case !g.ran:
		// Cobra's own parse errors: unknown command, wrong arguments.
		ee = &exitError{code: ExitUsage, msg: err.Error() + "\nRun 'vmctl --help' for usage."}
	default:
		ee = &exitError{code: ExitFailed, msg: err.Error()}
	}
	if ee.msg != "" {
		fmt.Fprintln(errOut, "vmctl:", ee.msg)
	}
	return ee.code
}

func version() string {
	if Version != "" {
		return Version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = ", modified"
			}
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" {
		v += " (" + rev + dirty + ")"
	}
	return v + " " + bi.GoVersion
}

// nameArg accepts exactly one VM name; a missing or extra argument is a
// usage error, and a name that breaks the rule is one too.
func nameArg(cmd *cobra.Command, args []string) error {
	if len(args) != 1 {
		return usageError("%s needs exactly one VM name (got %d arguments)\nUsage: %s", cmd.Name(), len(args), cmd.UseLine())
	}
	if err := vm.ValidateName(args[0]); err != nil {
		return usageError("NAME %q: %s", args[0], ruleOf(err))
	}
	return nil
}

func ruleOf(err error) string {
	var fe *vm.FieldError
	if errors.As(err, &fe) {
		return fe.Rule
	}
	return err.Error()
}

func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageError("%s takes no arguments (got %q)\nUsage: %s", cmd.Name(), args, cmd.UseLine())
	}
	return nil
}

// conn connects on first use, so that usage errors come first and help,
// version and completion scripts work without a server.
func (g *globals) conn() error {
	if g.js != nil {
		return nil
	}
	return g.connect()
}

func (g *globals) connect() error {
	g.names = events.Names{Prefix: g.prefix}
	opts := []nats.Option{nats.Name("vmctl"), nats.Timeout(2 * time.Second)}
	creds := g.creds
	if creds == "" {
		// On the engine's machine, a user who can read its admin
		// credentials needs no flag (like a kubeconfig).
		creds = datadir.LocalAdminCreds()
	}
	if creds != "" {
		opts = append(opts, nats.UserCredentials(creds))
		// Commands carry the identity's name as their issuer token (what
		// an operator's permissions require, and what the engines record).
		name, err := credsfile.Name(creds)
		if err != nil {
			return fmt.Errorf("reading credentials %s: %w", creds, err)
		}
		if vm.ValidateIdentity(name) == nil {
			g.issuer = name
		}
		// Replies come only to the inbox prefix the credentials allow.
		inbox, err := credsfile.InboxPrefix(creds)
		if err != nil {
			return fmt.Errorf("reading credentials %s: %w", creds, err)
		}
		if inbox != "" {
			opts = append(opts, nats.CustomInboxPrefix(inbox))
		}
	}
	if g.tlsCA != "" {
		opts = append(opts, nats.RootCAs(g.tlsCA))
	}
	nc, err := nats.Connect(g.server, opts...)
	if err != nil && strings.Contains(err.Error(), "Authorization Violation") {
		return fmt.Errorf("connecting to %s: %w\nhelp: the server needs credentials: --creds FILE or NATS_CREDS (the engine on this machine writes <data-dir>/auth/admin.creds, readable by its user; `engine creds --role operator --name NAME` issues others)", g.server, err)
	}
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

// engineServing tells whether an engine is deciding commands: every
// running engine keeps pull requests open on the shared command consumer,
// and they vanish with its connection. It samples for up to within (a
// busy engine renews its pulls), and on false says why.
func (g *globals) engineServing(ctx context.Context, within time.Duration) (bool, string, error) {
	deadline := time.Now().Add(within)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := g.js.Consumer(cctx, g.names.CommandsStream(), g.names.CommandConsumer())
		var info *jetstream.ConsumerInfo
		if err == nil {
			info = c.CachedInfo()
		}
		cancel()
		switch {
		case errors.Is(err, jetstream.ErrStreamNotFound):
			return false, fmt.Sprintf("stream %s does not exist: no vmherd engine has run on %s", g.names.CommandsStream(), g.server), nil
		case errors.Is(err, jetstream.ErrConsumerNotFound):
			return false, fmt.Sprintf("no engine has ever consumed %s on %s", g.names.CommandsStream(), g.server), nil
		case err != nil:
			return false, "", fmt.Errorf("asking for the engines' command consumer: %w", err)
		case info.NumWaiting > 0:
			return true, "", nil
		}
		if time.Now().After(deadline) {
			return false, fmt.Sprintf("no engine is consuming commands on %s (the command consumer %q has no active pull request)", g.server, g.names.CommandConsumer()), nil
		}
		select {
		case <-ctx.Done():
			return false, "", ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// watchHint is how to follow a stored command.
func watchHint(name string) string {
	return fmt.Sprintf("watch it with `vmctl events %s --follow` or `vmctl history %s`", name, name)
}

// send publishes a command and, unless --no-wait, waits for its result.
// It returns the final event (nil with --no-wait).
func (g *globals) send(ctx context.Context, name string, action fsm.Action, cmd events.Command) (*events.Event, error) {
	if err := vm.ValidateName(name); err != nil {
		return nil, usageError("NAME %q: %s", name, ruleOf(err))
	}
	if cmd.CommandID == "" {
		cmd.CommandID = newCommandID()
	}
	body, err := json.Marshal(cmd)
	if err != nil {
		return nil, err
	}
	if err := g.conn(); err != nil {
		return nil, err
	}
	serving, why, err := g.engineServing(ctx, time.Second)
	if err != nil {
		return nil, err
	}
	if !serving && !g.noWait {
		return nil, &exitError{code: ExitNoResult, msg: fmt.Sprintf("%s; nothing was sent.\nhelp: start the engine (`engine --with-worker`), or send with --no-wait to store the command for when an engine starts", why)}
	}
	// Read the VM's events from the stream, starting after its current end,
	// so that only stored events count: a core subscription can see an event
	// a moment before JetStream has stored it, and a next command sent on
	// that sight could be decided on the older state. The end is the
	// stream's last sequence as its handle reads it, before publishing.
	var store *events.Store
	var from uint64
	if !g.noWait {
		if store, err = events.NewStore(ctx, g.js, g.names, ""); err != nil {
			return nil, fmt.Errorf("%w (is the engine running?)", err)
		}
		from = store.Stream().CachedInfo().State.LastSeq + 1
	}
	// VM_COMMANDS deduplicates message ids across every VM; the command
	// id is only unique per VM, so the message id names the VM too.
	ack, err := g.js.Publish(ctx, g.names.IssuedCommand(name, string(action), g.issuer), body, jetstream.WithMsgID(events.CommandMsgID(name, cmd.CommandID)))
	if err != nil {
		return nil, fmt.Errorf("publishing %s for %s: %w (nothing was stored)", action, name, err)
	}
	if g.noWait {
		if !serving {
			fmt.Fprintf(g.errOut, "vmctl: warning: %s; the command is stored and will be applied when an engine starts\n", why)
		}
		g.printf("%s %s: stored as command %s (seq %d)\n", action, name, cmd.CommandID, ack.Sequence)
		if g.json {
			return nil, g.printJSON(map[string]any{"vm": name, "action": action, "command_id": cmd.CommandID, "seq": ack.Sequence})
		}
		return nil, nil
	}
	return g.wait(ctx, store, from, name, action, cmd.CommandID)
}

// wait follows the VM's events from stream sequence from until the
// command's result (or rejection), showing progress on a terminal, and
// says what became of the stored command when it stops waiting early. It
// reads by direct gets (events.Store.FollowVM) and leaves no consumer on
// the server.
func (g *globals) wait(ctx context.Context, store *events.Store, from uint64, name string, action fsm.Action, id string) (*events.Event, error) {
	wctx, cancel := context.WithTimeout(ctx, g.timeout)
	defer cancel()
	type delivered struct {
		ev  *events.Event
		seq uint64
	}
	evc := make(chan delivered)
	errc := make(chan error, 1)
	go func() {
		errc <- store.FollowVM(wctx, name, from, func(s events.Stored) bool {
			if s.Event == nil || s.Event.CommandID != id {
				return true
			}
			select {
			case evc <- delivered{s.Event, s.Seq}:
				return true
			case <-wctx.Done():
				return false
			}
		})
	}()

	p := g.newProgress(fmt.Sprintf("%s %s", action, name))
	defer p.clear()
	p.waitingFor("the engine's decision")
	var accepted *events.Event
	idle := 0 // consecutive seconds without an engine pulling commands
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	stored := func() string {
		if accepted != nil {
			return fmt.Sprintf("%s %s was accepted (command %s) and will still be carried out; %s", action, name, id, watchHint(name))
		}
		return fmt.Sprintf("%s %s is stored as command %s and will still be decided; %s", action, name, id, watchHint(name))
	}
	for {
		select {
		case got := <-evc:
			ev := got.ev
			switch {
			case !ev.FromEngine() && (accepted == nil || ev.Writer != accepted.Host):
				// Only an engine decides, and only the VM's host's worker
				// (or an engine) answers: anything else is ignored, as
				// the fold ignores it.
			case ev.Type == events.TypeRejected:
				p.clear()
				g.printEvent(ev)
				return ev, g.rejected(ctx, name, action, ev)
			case ev.Type == events.TypeAccepted && ev.Action == fsm.ActPurge:
				// A purge's decision is its outcome.
				p.clear()
				if g.json {
					g.printEvent(ev)
				} else {
					g.printf("purge %s: purged (command %s): its record and events are gone, the name is free\n", name, id)
				}
				g.awaitGone(wctx, name)
				return ev, nil
			case ev.Type == events.TypeAccepted && ev.Cancel:
				// A cancel ends the migration at once: its decision is
				// the outcome (the engines store the migrate's failure).
				p.clear()
				g.printEvent(ev)
				g.awaitRecord(wctx, name, got.seq)
				return ev, nil
			case ev.Type == events.TypeMigration:
				if m := ev.Migration; m != nil && m.Phase == events.PhaseCopying && m.Total > 0 {
					p.waitingFor(fmt.Sprintf("the copy to host %s (%d of %d MiB)", m.To, m.Bytes>>20, m.Total>>20))
				}
			case ev.Type == events.TypeAccepted:
				accepted = ev
				p.clear()
				if !g.json {
					g.printf("%s %s: accepted on host %s (%s)\n", action, name, ev.Host, ev.State)
				}
				p.waitingFor(fmt.Sprintf("the result from the worker on host %s", ev.Host))
			case ev.Type == events.TypeFailed:
				p.clear()
				g.printEvent(ev)
				g.awaitRecord(wctx, name, got.seq)
				return ev, &exitError{code: ExitFailed, msg: fmt.Sprintf("%s %s failed: %s", action, name, flagWords(ev.Error))}
			case ev.Type.IsResult():
				p.clear()
				g.printEvent(ev)
				g.awaitRecord(wctx, name, got.seq)
				return ev, nil
			}
		case err := <-errc:
			if wctx.Err() == nil {
				return nil, fmt.Errorf("reading %s's events: %w; %s", name, err, stored())
			}
			// The iterator stopped because wctx ended: handled below.
			<-wctx.Done()
		case <-wctx.Done():
		case <-tick.C:
			if accepted == nil {
				// Before the decision, an engine that went away is worth
				// saying at once rather than after --timeout.
				if ok, why, err := g.engineServing(wctx, 0); err == nil && !ok {
					if idle++; idle >= 3 {
						p.clear()
						return nil, &exitError{code: ExitNoResult, msg: fmt.Sprintf("%s; %s once an engine runs", why, stored())}
					}
				} else {
					idle = 0
				}
			}
			p.show()
			continue
		}
		if wctx.Err() == nil {
			continue
		}
		p.clear()
		if ctx.Err() != nil {
			return nil, &exitError{code: ExitInterrupted, msg: "interrupted: " + stored()}
		}
		return nil, &exitError{code: ExitNoResult, msg: fmt.Sprintf("no result within --timeout %s: %s", g.timeout, stored())}
	}
}

// awaitRecord waits, briefly, until the VM's record in VM_RECORDS has
// folded the event at seq, so that what vmctl does next with the record
// (ssh, provision, state) sees the result it just printed: the projector
// writes the record a moment after the event is stored. A record that does
// not catch up within recordLag is left as it is (the result stands).
func (g *globals) awaitRecord(ctx context.Context, name string, seq uint64) {
	ctx, cancel := context.WithTimeout(ctx, recordLag)
	defer cancel()
	for {
		if r, err := g.record(ctx, name); err == nil && r.LastSeq >= seq {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// recordLag bounds awaitRecord.
const recordLag = 5 * time.Second

// rejected explains a rejection, leading with "no VM named X" when the VM
// has never existed.
func (g *globals) rejected(ctx context.Context, name string, action fsm.Action, ev *events.Event) error {
	reason := flagWords(ev.Reason)
	if action != fsm.ActPrepare {
		if r, err := g.record(ctx, name); err != nil || !r.Exists() {
			var ee *exitError
			if err == nil || errors.As(err, &ee) {
				return &exitError{code: ExitFailed, msg: fmt.Sprintf("no VM named %s (`vmctl list` shows the VMs; create one with `vmctl create %s`); the engine rejected %s: %s", name, name, action, reason)}
			}
		}
	}
	return &exitError{code: ExitFailed, msg: fmt.Sprintf("%s %s rejected: %s", action, name, reason)}
}

// wireToFlag names the user's flags instead of wire fields in messages.
var wireToFlag = strings.NewReplacer(
	"spec.cloud_init.network_config", "--network-config",
	"spec.cloud_init.user_data", "--cloud-init",
	"spec.network.bridge", "--bridge",
	"spec.network.name", "--network vnic:NAME",
	"spec.network.type", "--network",
	"spec.network", "--network",
	"spec.image_path", "--image",
	"spec.image", "--image",
	"spec.memory_mb", "--memory",
	"spec.disk_gb", "--disk",
	"spec.vcpus", "--vcpus",
	"spec.backend", "--backend",
	"spec.accel", "--accel",
	"spec.labels", "--label",
	"spec.uefi", "--uefi",
	"spec.ssh.public_key", "--ssh-key",
	"spec.ssh.user", "--ssh-user",
	"timeout_s", "--stop-timeout",
)

func flagWords(s string) string { return wireToFlag.Replace(s) }

// progress shows, on a terminal, what vmctl is waiting for and since when.
type progress struct {
	w     io.Writer
	on    bool
	label string
	what  string
	since time.Time
	shown bool
}

func (g *globals) newProgress(label string) *progress {
	on := false
	switch g.progress {
	case "always":
		on = true
	case "never":
	default:
		f, ok := g.errOut.(*os.File)
		on = ok && term.IsTerminal(int(f.Fd()))
	}
	return &progress{w: g.errOut, on: on && !g.json, label: label}
}

func (p *progress) waitingFor(what string) {
	p.what, p.since = what, time.Now()
}

func (p *progress) show() {
	if !p.on {
		return
	}
	fmt.Fprintf(p.w, "\r\033[K%s: waiting for %s since %s (%s)", p.label, p.what,
		p.since.Format("15:04:05"), time.Since(p.since).Round(time.Second))
	p.shown = true
}

func (p *progress) clear() {
	if p.shown {
		fmt.Fprint(p.w, "\r\033[K")
		p.shown = false
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

func formatHostEvent(seq uint64, ev *events.HostEvent) string {
	s := ""
	if seq > 0 {
		s = fmt.Sprintf("%-6d ", seq)
	}
	s += fmt.Sprintf("%s host=%s %s", ev.Time.Format("15:04:05.000"), ev.Host, ev.Type)
	if ev.Reason != "" {
		s += " reason=" + fmt.Sprintf("%q", ev.Reason)
	}
	if len(ev.VMs) > 0 {
		s += " vms=" + strings.Join(ev.VMs, ",")
	}
	return s
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
	if m := ev.Migration; m != nil {
		s += fmt.Sprintf(" from=%s to=%s mode=%s", m.From, m.To, m.Mode)
		if m.Phase != "" {
			s += " phase=" + m.Phase
		}
		if m.Total > 0 || m.Bytes > 0 {
			s += fmt.Sprintf(" bytes=%d/%d", m.Bytes, m.Total)
		}
		if ev.Type == events.TypeMigrated && m.Mode == events.MigrateLive {
			s += fmt.Sprintf(" downtime=%dms", m.DowntimeMS)
		}
		if m.CancelledBy != "" {
			s += " cancelled_by=" + m.CancelledBy
		}
	}
	if ev.Cancel {
		s += " cancel"
	}
	return s
}

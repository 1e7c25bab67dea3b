// Package vmctl is the user's command-line client: it publishes lifecycle
// commands, waits for their result events, and reads records and events.
package vmctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/datadir"
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
	tlsCA    string
	prefix   string
	json     bool
	noWait   bool
	timeout  time.Duration
	progress string

	out, errOut io.Writer
	c           *client.Client // once connected
	// ran is set once flags and arguments parsed and a command began: an
	// error before that is a usage error.
	ran bool
	// printed: the invocation's JSON document is out (--json prints one).
	printed bool
}

// exitError carries an exit code without printing usage, and for --json
// the kind of error (rejected, failed, timeout, no_engine, not_allowed,
// not_found, usage, interrupted, error) and the error it explains.
type exitError struct {
	code int
	kind string
	msg  string
	err  error
}

func (e *exitError) Error() string { return e.msg }
func (e *exitError) Unwrap() error { return e.err }

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
			return nil
		},
		PersistentPostRun: func(*cobra.Command, []string) {
			if g.c != nil {
				g.c.Close()
			}
		},
	}
	root.SetVersionTemplate("vmctl {{.Version}}\n")
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageError("%s\nRun '%s --help' for usage.", flagErrorWords(err), c.CommandPath())
	})
	def := os.Getenv("NATS_URL")
	if def == "" {
		// The engine on this machine: where VMHERD_LISTEN (its --listen)
		// says its embedded server listens, else the default.
		def = client.DefaultURL
		if l := os.Getenv("VMHERD_LISTEN"); l != "" {
			def = "nats://" + l
		}
	}
	pf := root.PersistentFlags()
	pf.StringVarP(&g.server, "server", "s", def, "NATS server URL (env NATS_URL)")
	pf.StringVar(&g.creds, "creds", os.Getenv("NATS_CREDS"), "NATS credentials file (env NATS_CREDS; default: the local engine's admin.creds when readable)")
	pf.StringVar(&g.tlsCA, "tls-ca", os.Getenv("NATS_CA"), "CA certificate(s) to verify a TLS server (PEM; env NATS_CA)")
	pf.StringVar(&g.prefix, "prefix", api.DefaultPrefix, "subject prefix of the vmherd installation")
	pf.BoolVar(&g.json, "json", false, "print JSON for scripts")
	pf.BoolVar(&g.noWait, "no-wait", false, "return once the command is stored, without waiting for its result")
	pf.DurationVar(&g.timeout, "timeout", 5*time.Minute, "how long to wait for a result")
	pf.StringVar(&g.progress, "progress", "auto", "show what vmctl waits for: auto (on a terminal), always or never")

	root.AddCommand(
		g.createCmd(),
		g.lifecycleCmd(api.ActStart, "start a prepared or stopped VM"),
		g.stopCmd(),
		g.lifecycleCmd(api.ActSuspend, "pause a running VM"),
		g.lifecycleCmd(api.ActResume, "continue a suspended VM"),
		g.restartCmd(),
		g.waitCmd(),
		g.destroyCmd(),
		g.purgeCmd(),
		g.migrateCmd(),
		g.listCmd(),
		g.statusCmd(),
		g.infoCmd(),
		g.topCmd(),
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
		ee = &exitError{code: ExitFailed, msg: err.Error(), err: err}
		if errors.Is(err, client.ErrNotAllowed) {
			ee.kind = "not_allowed"
		}
	}
	if ee.kind == "" {
		switch ee.code {
		case ExitUsage:
			ee.kind = "usage"
		case ExitNoResult:
			ee.kind = "no_result"
		case ExitInterrupted:
			ee.kind = "interrupted"
		default:
			ee.kind = "error"
		}
	}
	if ee.msg != "" {
		fmt.Fprintln(errOut, "vmctl:", ee.msg)
	}
	if g.json && !g.printed {
		// Under --json every invocation prints one document: this one
		// when the command printed none.
		_ = g.printJSON(map[string]any{"error": errorDoc(ee)})
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
	if err := api.ValidateName(args[0]); err != nil {
		return usageError("NAME %q: %s", args[0], ruleOf(err))
	}
	return nil
}

func ruleOf(err error) string {
	var fe *api.FieldError
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
	if g.c != nil {
		return nil
	}
	return g.connect()
}

func (g *globals) connect() error {
	o := client.Options{URL: g.server, Creds: g.creds, TLSCA: g.tlsCA, Prefix: g.prefix, Name: "vmctl"}
	if o.Creds == "" {
		// On the engine's machine, a user who can read its admin
		// credentials needs no flag (like a kubeconfig).
		o.Creds = datadir.LocalAdminCreds()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Connect(ctx, o)
	var ce *client.ConnectError
	switch {
	case errors.As(err, &ce) && ce.NeedsCreds:
		return &exitError{code: ExitNoResult, msg: fmt.Sprintf("%v\nhelp: the server needs credentials: --creds FILE or NATS_CREDS (the engine on this machine writes <data-dir>/auth/admin.creds, readable by its user; `engine creds --role operator --name NAME` issues others)", err)}
	case errors.As(err, &ce):
		return &exitError{code: ExitNoResult, msg: fmt.Sprintf("%v\nhelp: is the engine running? start it with `engine --with-worker`, or point --server/NATS_URL at your NATS", err)}
	case err != nil:
		return err
	}
	g.c = c
	return nil
}

// watchHint is how to follow a stored command.
func watchHint(name string) string {
	return fmt.Sprintf("watch it with `vmctl events %s --follow` or `vmctl history %s`", name, name)
}

// wireToFlag names the user's flags instead of wire fields in messages.
var wireToFlag = strings.NewReplacer(
	// api's wording names both image fields; vmctl has one flag for both.
	"spec.image_path: is required for the qemu backend (or spec.image, a name in the host's image store)",
	"--image: is required for the qemu backend (a base image's path on the host, or the name of an image in the hosts' stores: vmctl image pull)",
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

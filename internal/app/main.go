package app

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/datadir"
	"github.com/vmherd/vmherd/internal/metrics"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/safefile"
)

// credsCmd is `engine creds`: credentials signed by the engine's
// authority (in its data dir) for an identity with a role.
func credsCmd() *cobra.Command {
	var (
		dir, role, host, name, out, prefix string
		serverConfig                       bool
	)
	c := &cobra.Command{
		Use:   "creds",
		Short: "issue NATS credentials for a worker, a user or another engine; or print the nats-server configuration that trusts them",
		Long: `creds signs a credentials file with the authority kept in the engine's
data dir (created on first use), for one identity:

  engine creds --role worker --host h2 -o h2.creds   # the worker of host h2
  engine creds --role operator --name alice          # drives VMs, reads everything
  engine creds --role viewer --name dashboards       # reads only
  engine creds --role admin                          # everything
  engine creds --role engine --name engine2          # another engine

With --server-config it prints the nats-server configuration lines that
trust this authority (for a NATS cluster of your own: include them in each
node's configuration). The roles are in docs/trust.md.`,
		SilenceUsage: true,
		Args:         cobra.NoArgs,
		PreRunE:      func(cmd *cobra.Command, _ []string) error { return BindEnv(cmd.Flags()) },
		RunE: func(cmd *cobra.Command, _ []string) error {
			a, err := auth.Open(datadir.AuthDir(dir))
			if err != nil {
				return err
			}
			if serverConfig {
				conf, err := a.ServerConfig()
				if err != nil {
					return err
				}
				fmt.Fprint(cmd.OutOrStdout(), conf)
				return nil
			}
			id := auth.Identity{Role: auth.Role(role), Host: host, User: name, Names: api.Names{Prefix: prefix}}
			if id.Role == auth.RoleWorker && host == "" {
				return fmt.Errorf("--role worker needs --host")
			}
			if id.Role != auth.RoleWorker && host != "" {
				return fmt.Errorf("--host is for --role worker only")
			}
			b, err := a.IdentityCreds(id)
			if err != nil {
				return err
			}
			// Replies reach an identity only on its own inbox prefix: the
			// nats CLI needs it given (vmctl reads it from the file).
			inbox := fmt.Sprintf("its inbox prefix: %s (nats CLI: --inbox-prefix %s)", id.InboxPrefix(), id.InboxPrefix())
			if out == "" || out == "-" {
				_, err = cmd.OutOrStdout().Write(b)
				fmt.Fprintf(cmd.ErrOrStderr(), "%s credentials; %s\n", id.Name(), inbox)
				return err
			}
			// A new 0600 file renamed into place: never through a symlink
			// planted at out, never keeping an existing file's mode.
			if err := safefile.Write(out, b, 0o600); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "wrote %s credentials to %s; %s\n", id.Name(), out, inbox)
			return nil
		},
	}
	fs := c.Flags()
	fs.StringVar(&dir, "data-dir", DefaultDataDir(), "the engine's data directory (its authority is in <data-dir>/auth)")
	fs.StringVar(&role, "role", "", "admin, engine, operator, viewer or worker")
	fs.StringVar(&host, "host", "", "the worker's host (--role worker)")
	fs.StringVar(&name, "name", "", "a name for the identity (default: the role)")
	fs.StringVarP(&out, "output", "o", "", "write to this file (mode 0600) instead of stdout")
	fs.StringVar(&prefix, "prefix", api.DefaultPrefix, "subject prefix of the installation")
	fs.BoolVar(&serverConfig, "server-config", false, "print the nats-server configuration that trusts this authority")
	return c
}

// EngineMain is cmd/engine.
func EngineMain(args []string) int {
	var o EngineOptions
	var configPath string
	root := &cobra.Command{
		Use:   "engine",
		Short: "vmherd engine: decide lifecycle commands (queueing tasks), keep the projection",
		Long: `The engine consumes VM_COMMANDS, runs each VM's state machine, appends
accepted/rejected events to VM_EVENTS, publishes tasks to the chosen host and
keeps the VM_RECORDS projection. Without --nats-url it embeds a NATS server
with JetStream on disk under --data-dir, listening on --listen.
Every flag can also be set as VMHERD_<FLAG> (e.g. VMHERD_DATA_DIR), or as a
key of the --config file (` + "`engine config --print`" + ` lists them).
Credentials the servers refuse, or a certificate that does not verify, stop
it at once with exit code 78; a server that does not answer yet is waited for.`,
		SilenceUsage: true,
		Args:         cobra.NoArgs,
		PreRunE:      func(cmd *cobra.Command, _ []string) error { return configure(cmd.Flags(), &configPath) },
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := NewLogger(o.LogLevel)
			if err != nil {
				return err
			}
			return runUntilSignalled(log, o.DrainTimeout, func(ctx context.Context) error { return RunEngine(ctx, o) })
		},
	}
	addConfigFlag(root.Flags(), &configPath, "engine")
	o.AddFlags(root.Flags())

	var conn ConnOptions
	var so StreamOptions
	rebuild := &cobra.Command{
		Use:   "rebuild",
		Short: "drop VM_RECORDS and rebuild it from VM_EVENTS",
		Long: `rebuild folds the whole event stream into records and replaces the
VM_RECORDS bucket with them. It connects to a running server (the engine's
embedded one by default); running engines carry on safely.`,
		SilenceUsage: true,
		Args:         cobra.NoArgs,
		PreRunE:      func(cmd *cobra.Command, _ []string) error { return BindEnv(cmd.Flags()) },
		RunE: func(cmd *cobra.Command, _ []string) error {
			conn.Name = "vmherd-rebuild"
			if conn.Creds == "" {
				conn.Creds = datadir.LocalAdminCreds()
			}
			nc, js, err := conn.ConnectJS(false)
			if err != nil {
				return err
			}
			defer nc.Close()
			n, count, err := projection.Rebuild(cmd.Context(), js, so.Names(), so.Settings())
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "rebuilt %d records from %d events\n", n, count)
			return nil
		},
	}
	conn.AddFlags(rebuild.Flags(), "nats://127.0.0.1:4222")
	so.AddFlags(rebuild.Flags())
	root.AddCommand(rebuild, credsCmd(), configCmd("engine", func() *pflag.FlagSet {
		var o EngineOptions
		var p string
		fs := pflag.NewFlagSet("engine", pflag.ContinueOnError)
		addConfigFlag(fs, &p, "engine")
		o.AddFlags(fs)
		return fs
	}))
	root.AddCommand(engineExtraCommands()...)
	root.SetArgs(args)
	return exitCode(root.Execute())
}

// workerFlags are cmd/worker's flags.
type workerFlags struct {
	wo       WorkerOptions
	conn     ConnOptions
	prefix   string
	logLevel string
	drain    time.Duration
	mlisten  string
	config   string
}

func (f *workerFlags) add(fs *pflag.FlagSet) {
	addConfigFlag(fs, &f.config, "worker")
	f.wo.AddFlags(fs, true)
	f.conn.AddFlags(fs, "nats://127.0.0.1:4222")
	// Streams and buckets belong to the engine: a worker only names them.
	fs.StringVar(&f.prefix, "prefix", api.DefaultPrefix, "subject prefix of the vmherd installation (the engine's --prefix)")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&f.mlisten, "metrics-listen", "", "serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9101; default: off)")
	addDrainFlag(fs, &f.drain)
}

// WorkerMain is cmd/worker.
func WorkerMain(args []string) int {
	var f workerFlags
	root := &cobra.Command{
		Use:   "worker",
		Short: "vmherd worker: run one host's lifecycle tasks on its hypervisors",
		Long: `The worker heartbeats into VM_HOSTS, consumes vm.task.<host>.>, runs each
backend call, records exactly one result event per command, answers live
queries (state, guest_ip, console_endpoint) as the NATS micro service
vmherd-worker-<host>, and watches its VMs for drift.
Every flag can also be set as VMHERD_<FLAG> (e.g. VMHERD_HOST), or as a key
of the --config file (` + "`worker config --print`" + ` lists them).
Credentials the servers refuse, or a certificate that does not verify, stop
it at once with exit code 78; a server that does not answer yet is waited for.`,
		SilenceUsage: true,
		Args:         cobra.NoArgs,
		PreRunE:      func(cmd *cobra.Command, _ []string) error { return configure(cmd.Flags(), &f.config) },
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runWorker(f)
		},
	}
	f.add(root.Flags())
	root.AddCommand(configCmd("worker", func() *pflag.FlagSet {
		var g workerFlags
		fs := pflag.NewFlagSet("worker", pflag.ContinueOnError)
		g.add(fs)
		return fs
	}))
	root.AddCommand(workerExtraCommands()...)
	root.SetArgs(args)
	err := root.Execute()
	return exitCode(err)
}

// runWorker runs cmd/worker until a signal, or until NATS refuses it for
// good.
func runWorker(f workerFlags) error {
	log, err := NewLogger(f.logLevel)
	if err != nil {
		return err
	}
	wo, conn := f.wo, f.conn
	if err := credsForHost(conn.Creds, wo.Host); err != nil {
		return err
	}
	conn.Name = "vmherd-worker-" + wo.Host
	// Without credentials (no auth) the worker still keeps to its
	// own inbox prefix; with them, Connect takes theirs.
	conn.InboxPrefix = auth.Identity{Role: auth.RoleWorker, Host: wo.Host}.InboxPrefix()
	return runUntilSignalled(log, f.drain, func(ctx context.Context) error {
		ctx, fail := context.WithCancelCause(ctx)
		defer fail(nil)
		err := func() error {
			nc, js, err := conn.DialDaemon(ctx, log, fail)
			if err != nil {
				return err
			}
			defer nc.Close()
			if f.mlisten != "" {
				wo.Metrics = metrics.New()
				if _, err := wo.Metrics.Serve(ctx, f.mlisten, log); err != nil {
					return err
				}
			}
			w, err := wo.NewWorker(ctx, Connected{NC: nc, JS: js}, api.Names{Prefix: f.prefix}, log)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			log.Info("worker serving", "host", wo.Host, "nats", conn.URL)
			sdNotify(log, "READY=1")
			go returnMemory(ctx)
			return w.Run(ctx)
		}()
		if c := context.Cause(ctx); errors.Is(c, ErrWillNotHeal) {
			return c
		}
		if errors.Is(err, context.Canceled) {
			return nil
		}
		return err
	})
}

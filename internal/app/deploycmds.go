package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/deploy"
	"github.com/vmherd/vmherd/internal/join"
	"github.com/vmherd/vmherd/internal/preflight"
	"github.com/vmherd/vmherd/internal/safefile"
)

// engineExtraCommands are engine init, token and revoke (docs/deploy.md).
func engineExtraCommands() []*cobra.Command {
	var o deploy.InitOptions
	var nodes, engines, hosts []string
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "make a new fleet: authority, CA, NATS node configs, engine configs and creds, join tokens",
		Long: `init makes, on the first machine, everything a fleet of real machines needs
(docs/deploy.md walks through it):

  engine init --nodes m1,m2,m3 --engines m1,m2 --hosts m2,m3

- the authority (keys that sign every credential) and a CA, in
  --authority-dir on this machine (which should be the first engine);
- for each machine, a directory <out>/<machine> to copy to /etc/vmherd
  there: its nats-server configuration (cluster routes, TLS, JetStream
  store, the resolver), certificate and key; an engine's configuration
  and credentials;
- <out>/admin.creds and <out>/ca.pem for vmctl;
- <out>/join/<host>.token for each host: worker join --token FILE on the
  host. Tokens expire (--token-ttl) and work once.

A node is NAME or NAME=ADDRESS (the address the others reach it at: the
name by default). Secrets are written mode 0600.`,
		SilenceUsage: true,
		Args:         cobra.NoArgs,
		PreRunE:      func(cmd *cobra.Command, _ []string) error { return BindEnv(cmd.Flags()) },
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if o.Nodes, err = deploy.ParseNodes(nodes); err != nil {
				return err
			}
			o.Engines, o.Hosts = splitList(engines), splitList(hosts)
			out, err := deploy.Init(o)
			if err != nil {
				return err
			}
			fmt.Fprint(cmd.OutOrStdout(), out)
			return nil
		},
	}
	fs := initCmd.Flags()
	fs.StringSliceVar(&nodes, "nodes", nil, "the NATS cluster's machines, NAME[=ADDRESS],... (3 or 5)")
	fs.StringSliceVar(&engines, "engines", nil, "the machines that run an engine; the first is this one and keeps the authority")
	fs.StringSliceVar(&hosts, "hosts", nil, "hosts (workers) to make join tokens for")
	fs.StringVarP(&o.Out, "out", "o", "vmherd-fleet", "directory for the files to copy to each machine (must not exist)")
	fs.StringVar(&o.AuthorityDir, "authority-dir", deploy.AuthorityDir, "where the authority's keys go on this machine (must not exist)")
	fs.StringVar(&o.CACert, "ca-cert", "", "a CA certificate of yours to sign the NATS nodes' certificates (default: make a CA)")
	fs.StringVar(&o.CAKey, "ca-key", "", "its key (PEM)")
	fs.DurationVar(&o.TokenTTL, "token-ttl", join.DefaultTTL, "how long the join tokens last")
	fs.IntVar(&o.ClientPort, "client-port", 4222, "NATS client port on every node")
	fs.IntVar(&o.ClusterPort, "cluster-port", 6222, "NATS cluster (route) port on every node")
	fs.IntVar(&o.MonitorPort, "monitor-port", 8222, "NATS monitoring port (loopback)")
	fs.IntVar(&o.Replicas, "replicas", 0, "stream replicas (default: 3, or the number of nodes if fewer)")
	fs.StringVar(&o.Prefix, "prefix", "", "subject prefix of the installation (default vm)")
	fs.StringVar(&o.Sync, "sync", "", `JetStream sync_interval of the nodes (default "always")`)

	var dir, host, out string
	var ttl time.Duration
	token := &cobra.Command{
		Use:   "token",
		Short: "issue a join token for a host (with the authority engine init made)",
		Long: `token issues a join token for one host, to add a host or to rotate its
credentials: on the host, worker join --token FILE. It expires after --ttl
and works once.`,
		SilenceUsage: true,
		Args:         cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			t, err := deploy.IssueToken(dir, host, ttl)
			if err != nil {
				return err
			}
			if out == "" || out == "-" {
				_, err = io.WriteString(cmd.OutOrStdout(), t.Encode())
				return err
			}
			if err := safefile.Write(out, []byte(t.Encode()), 0o600); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "wrote a join token for %s to %s (expires %s; works once)\n", host, out, t.Expires.UTC().Format(time.RFC3339))
			return nil
		},
	}
	token.Flags().StringVar(&dir, "authority-dir", deploy.AuthorityDir, "the authority engine init made")
	token.Flags().StringVar(&host, "host", "", "the host's id")
	token.Flags().DurationVar(&ttl, "ttl", join.DefaultTTL, "how long the token lasts")
	token.Flags().StringVarP(&out, "output", "o", "", "write to this file (mode 0600) instead of stdout")
	_ = token.MarkFlagRequired("host")

	var keepLatest bool
	revoke := &cobra.Command{
		Use:   "revoke",
		Short: "revoke a host's worker credentials on every NATS node",
		Long: `revoke revokes every worker credential the authority issued to a host (a
lost or stolen machine) and pushes the change to every NATS node, which
closes the host's connections and refuses its credentials from then on.
With --keep-latest it keeps the newest (rotation: worker join with a new
token first, then revoke --keep-latest).`,
		SilenceUsage: true,
		Args:         cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := deploy.Revoke(cmd.Context(), dir, host, keepLatest)
			for _, k := range r.Keys {
				fmt.Fprintf(cmd.OutOrStdout(), "revoked worker-%s key %s\n", host, k)
			}
			if r.Kept != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "kept worker-%s key %s (the newest)\n", host, r.Kept)
			}
			if err != nil {
				return fmt.Errorf("%w (the revocation is recorded in %s: run revoke again once the nodes answer)", err, dir)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%d of %d NATS nodes have the revocation\n", r.Pushed, r.Nodes)
			return nil
		},
	}
	revoke.Flags().StringVar(&dir, "authority-dir", deploy.AuthorityDir, "the authority engine init made")
	revoke.Flags().StringVar(&host, "host", "", "the host whose credentials to revoke")
	revoke.Flags().BoolVar(&keepLatest, "keep-latest", false, "keep the newest credentials (rotation)")
	_ = revoke.MarkFlagRequired("host")
	return []*cobra.Command{initCmd, token, revoke}
}

func splitList(l []string) []string {
	var out []string
	for _, s := range l {
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

// workerExtraCommands are worker join and worker preflight.
func workerExtraCommands() []*cobra.Command {
	var tokenFile, etc, dataDir, backends string
	var imageDirs []string
	var rewrite bool
	joinCmd := &cobra.Command{
		Use:   "join",
		Short: "join this host to a fleet with a token: get its credentials, write its config, run the preflight",
		Long: `join uses a token from engine init or engine token (a file; - for stdin) to
get this host's worker credentials from the fleet: it makes the host's key
here, the engine that keeps the authority signs it. It writes, in
--etc-dir, worker.creds (0600), ca.pem and worker.toml (unless it exists:
a rejoin to rotate the credentials keeps it), removes the token
(it works once), then checks the host (worker preflight) and prints what
it found. Start the worker next: systemctl enable --now vmherd-worker.`,
		SilenceUsage: true,
		Args:         cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var b []byte
			var err error
			if tokenFile == "-" {
				b, err = io.ReadAll(cmd.InOrStdin())
			} else {
				b, err = os.ReadFile(tokenFile)
			}
			if err != nil {
				return err
			}
			t, err := join.Decode(string(b), time.Now())
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			j, err := join.Join(ctx, t)
			if err != nil {
				return err
			}
			creds, ca, conf := filepath.Join(etc, "worker.creds"), filepath.Join(etc, "ca.pem"), filepath.Join(etc, "worker.toml")
			if err := os.MkdirAll(etc, 0o755); err != nil {
				return err
			}
			if err := safefile.Write(creds, j.Creds, 0o600); err != nil {
				return err
			}
			if err := safefile.Write(ca, []byte(j.CA), 0o644); err != nil {
				return err
			}
			// A rejoin (rotation) keeps the host's configuration as it is:
			// it names the same credentials and CA files.
			wroteConf := false
			if _, err := os.Stat(conf); err != nil || rewrite {
				if err := safefile.Write(conf, []byte(workerConfig(j, creds, ca, dataDir, backends, imageDirs)), 0o644); err != nil {
					return err
				}
				wroteConf = true
			}
			if tokenFile != "-" {
				_ = os.Remove(tokenFile)
			}
			w := cmd.OutOrStdout()
			if wroteConf {
				fmt.Fprintf(w, "joined as host %s: wrote %s, %s, %s\n", j.Host, creds, ca, conf)
			} else {
				fmt.Fprintf(w, "joined as host %s: wrote %s, %s; kept %s as it is (--rewrite-config writes a new one)\n", j.Host, creds, ca, conf)
			}
			failed := preflight.Print(w, preflight.Run(ctx, preflight.Options{
				QEMU: strings.Contains(backends, "qemu"), DataDir: dataDir, NATSURLs: j.URLs,
				Files: []string{conf, ca}, Secrets: []string{creds}, Skew: &j.Skew, MinFreeGiB: 1,
				MetricsListen: "127.0.0.1:9101",
			}))
			if failed {
				return errors.New("preflight: some checks failed (FAIL above): fix them before starting the worker")
			}
			fmt.Fprintln(w, "next: systemctl enable --now vmherd-worker")
			return nil
		},
	}
	jf := joinCmd.Flags()
	jf.StringVar(&tokenFile, "token", "", "the join token file (- for stdin)")
	jf.StringVar(&etc, "etc-dir", deploy.EtcDir, "where to write worker.toml, worker.creds and ca.pem")
	jf.StringVar(&dataDir, "data-dir", deploy.VarDir+"/worker", "the worker's data directory (data-dir in worker.toml)")
	jf.StringVar(&backends, "backends", "qemu", "backends in worker.toml")
	jf.StringArrayVar(&imageDirs, "image-dir", []string{"/opt/vmherd/images"}, "image-dir entries in worker.toml (base images may come from there)")
	jf.BoolVar(&rewrite, "rewrite-config", false, "write worker.toml even if it exists (a rejoin keeps it by default)")
	_ = joinCmd.MarkFlagRequired("token")

	var f workerFlags
	pre := &cobra.Command{
		Use:   "preflight",
		Short: "check that this machine can run the worker as configured, and print what was found",
		Long: `preflight checks, with the worker's configuration (--config and the same
flags): the QEMU binaries, KVM (else TCG), bridges, free disk space, the
clock, the NATS servers' ports, the metrics port, and that the files the
worker reads as root are not writable (secrets: not readable) by others.
It exits 1 if a check failed.`,
		SilenceUsage: true,
		Args:         cobra.NoArgs,
		PreRunE:      func(cmd *cobra.Command, _ []string) error { return configure(cmd.Flags(), &f.config) },
		RunE: func(cmd *cobra.Command, _ []string) error {
			o := preflight.Options{QEMU: strings.Contains(f.wo.Backends, "qemu"), DataDir: f.wo.DataDir,
				NATSURLs: f.conn.URL, MetricsListen: f.mlisten, MinFreeGiB: 1}
			for _, p := range []string{f.config, f.conn.TLSCA} {
				if p != "" {
					o.Files = append(o.Files, p)
				}
			}
			if f.conn.Creds != "" {
				o.Secrets = append(o.Secrets, f.conn.Creds)
			}
			if preflight.Print(cmd.OutOrStdout(), preflight.Run(cmd.Context(), o)) {
				return errors.New("preflight: some checks failed")
			}
			return nil
		},
	}
	f.add(pre.Flags())
	return []*cobra.Command{joinCmd, pre}
}

// workerConfig is the worker.toml join writes.
func workerConfig(j join.Joined, creds, ca, dataDir, backends string, imageDirs []string) string {
	var q []string
	for _, d := range imageDirs {
		q = append(q, fmt.Sprintf("%q", d))
	}
	return fmt.Sprintf(`# The worker of host %[1]s, written by worker join. Every key is a flag:
# worker config --print lists them all with their defaults.
host = %[1]q
nats-url = %[2]q
creds = %[3]q
tls-ca = %[4]q
prefix = %[5]q
data-dir = %[6]q
backends = %[7]q
image-dir = [%[8]s]
metrics-listen = "127.0.0.1:9101"
`, j.Host, j.URLs, creds, ca, j.Prefix, dataDir, backends, strings.Join(q, ", "))
}

// joinService runs the join service when the engine keeps the authority
// (--authority-dir): hosts with a token get their credentials from it.
func joinService(ctx context.Context, o EngineOptions, conn ConnOptions, log *slog.Logger, fail func(error)) (func(context.Context) error, func(), error) {
	// The fleet first: auth.Open would make a new authority in a wrong dir.
	f, err := deploy.ReadFleet(o.AuthorityDir)
	if err != nil {
		return nil, nil, fmt.Errorf("--authority-dir: %w", err)
	}
	a, err := auth.Open(o.AuthorityDir)
	if err != nil {
		return nil, nil, err
	}
	credsPath := filepath.Join(o.AuthorityDir, "join-service.creds")
	if _, err := os.Stat(credsPath); err != nil {
		b, _, err := a.LimitedCreds("join-service", join.ServicePermissions(), time.Time{})
		if err != nil {
			return nil, nil, err
		}
		if err := safefile.Write(credsPath, b, 0o600); err != nil {
			return nil, nil, err
		}
	}
	c := conn
	c.Creds, c.Name, c.InboxPrefix = credsPath, "vmherd-join-service", ""
	nc, _, err := c.DialDaemon(ctx, log, fail)
	if err != nil {
		return nil, nil, fmt.Errorf("join service: %w", err)
	}
	s := &join.Service{Authority: a, URLs: f.URLs, Prefix: f.Prefix, CA: f.CA, Log: log}
	return func(ctx context.Context) error { return s.Serve(ctx, nc) }, nc.Close, nil
}

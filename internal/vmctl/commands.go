package vmctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/projection"
)

func (g *globals) createCmd() *cobra.Command {
	var (
		spec                      api.VmSpec
		network, bridge           string
		cloudInit, sshKey, netCfg string
		host, backend             string
		start, ifNotExists        bool
		sshUser                   string
	)
	c := &cobra.Command{
		Use:               "create NAME",
		Short:             "prepare a VM (disk overlay, cloud-init seed, network), optionally --start it",
		Args:              nameArg,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: func(cmd *cobra.Command, args []string) error {
			if start && g.noWait {
				return usageError("--start with --no-wait: start is sent only once prepare has succeeded, so vmctl must wait for it.\nhelp: drop --no-wait, or run `vmctl create %s --no-wait` and later `vmctl start %s`", args[0], args[0])
			}
			spec.Name = args[0]
			spec.Backend = api.BackendTag(backend)
			if spec.ImagePath != "" && !strings.Contains(spec.ImagePath, "/") {
				// A name in the hosts' image stores, not a path.
				spec.Image, spec.ImagePath = spec.ImagePath, ""
			}
			n := &api.NetworkConfig{Type: api.NetworkType(network)}
			if t, arg, ok := strings.Cut(network, ":"); ok {
				n.Type = api.NetworkType(t)
				switch n.Type {
				case api.NetworkTap:
					n.Bridge = arg
				case api.NetworkVnic:
					n.Name = arg
				}
			}
			if bridge != "" {
				n.Bridge = bridge
			}
			spec.Network = n
			if cloudInit != "" || netCfg != "" {
				spec.CloudInit = &api.CloudInitConfig{}
				if cloudInit != "" {
					b, err := os.ReadFile(cloudInit)
					if err != nil {
						return usageError("--cloud-init: %v", err)
					}
					spec.CloudInit.UserData = string(b)
				}
				if netCfg != "" {
					b, err := os.ReadFile(netCfg)
					if err != nil {
						return usageError("--network-config: %v", err)
					}
					spec.CloudInit.NetworkConfig = string(b)
				}
			}
			if sshKey != "" {
				key, err := readPublicKey(sshKey)
				if err != nil {
					return err
				}
				spec.SSH = &api.SshConfig{User: sshUser, PublicKey: key}
			}
			if err := spec.Validate(); err != nil {
				return usageError("%s", flagWords(err.Error()))
			}
			ctx := cmd.Context()
			l := g.newLifecycle(spec.Name)
			if ifNotExists {
				if err := g.conn(); err != nil {
					return err
				}
				r, err := g.c.Record(ctx, spec.Name)
				switch {
				case err == nil && r.Live():
					l.skip(api.ActPrepare, fmt.Sprintf("already exists (state %s); --if-not-exists", r.State))
					l.doc.Record = r
					return l.done(ctx, nil)
				case err != nil && !errors.Is(err, client.ErrNotFound):
					return g.commandErr(err)
				}
			}
			ev, err := l.send(ctx, api.ActPrepare, api.Command{Spec: &spec, Host: host})
			if err == nil && start && ev != nil {
				_, err = l.send(ctx, api.ActStart, api.Command{})
			} else if err != nil {
				err = g.explainExists(ctx, spec.Name, err)
			}
			return l.done(ctx, err)
		},
	}
	f := c.Flags()
	f.StringVar(&spec.ImagePath, "image", "", "base disk image: a path on the VM's host (qcow2 or raw; it contains a /), or the name of an image in the hosts' image stores (vmctl image pull), which places the VM on a host that has it")
	f.IntVar(&spec.Vcpus, "vcpus", 1, "virtual CPUs")
	f.IntVar(&spec.MemoryMB, "memory", 512, "memory in MiB")
	f.IntVar(&spec.DiskGB, "disk", 0, "grow the disk overlay to this many GiB (0: base size)")
	f.StringVar(&network, "network", "user", "user, tap[:BRIDGE], vnic[:NAME] or none")
	f.StringVar(&bridge, "bridge", "", "bridge for tap networking")
	f.StringVar(&cloudInit, "cloud-init", "", "file with cloud-init user-data")
	f.StringVar(&netCfg, "network-config", "", "file with cloud-init network-config")
	f.StringVar(&sshKey, "ssh-key", "", "file with an SSH public key for the generated user-data")
	f.StringVar(&sshUser, "ssh-user", "vm", "user created with --ssh-key")
	f.BoolVar(&spec.UEFI, "uefi", false, "boot with UEFI (OVMF)")
	f.StringVar(&spec.Accel, "accel", "", "QEMU accelerator: auto, kvm or tcg")
	f.StringVar(&backend, "backend", "", "noop, qemu or propolis (default: the host's default)")
	f.StringVar(&host, "host", "", "pin the VM to this host (default: an alive host with the backend, real hypervisors before Noop, most free memory first)")
	f.BoolVar(&start, "start", false, "start the VM once prepared (waits for prepare; not with --no-wait)")
	f.BoolVar(&ifNotExists, "if-not-exists", false, "succeed without doing anything when a VM of that name exists (in any state but destroyed)")
	return c
}

// explainExists words a rejected prepare of a name in use as what it is.
func (g *globals) explainExists(ctx context.Context, name string, err error) error {
	var rej *client.RejectedError
	if !errors.As(err, &rej) {
		return err
	}
	if r, rerr := g.c.Record(ctx, name); rerr == nil && r.Live() {
		return &exitError{code: ExitFailed, kind: "exists", err: err, msg: fmt.Sprintf("a VM named %s already exists (state %s): the engine rejected prepare: %s\nhelp: --if-not-exists makes that a success; `vmctl destroy %s` frees the name", name, r.State, flagWords(rej.Reason), name)}
	}
	return err
}

// readPublicKey reads --ssh-key: a file holding one SSH public key.
func readPublicKey(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", usageError("--ssh-key %s: %v (give the path of a public key file, e.g. ~/.ssh/id_ed25519.pub)", path, err)
	}
	if !fi.Mode().IsRegular() {
		return "", usageError("--ssh-key %s is not a regular file (give the path of a public key file, e.g. ~/.ssh/id_ed25519.pub)", path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", usageError("--ssh-key: %v", err)
	}
	key := strings.TrimSpace(string(b))
	switch {
	case strings.Contains(key, "PRIVATE KEY"):
		return "", usageError("--ssh-key %s is a private key; give its public half (%s.pub)", path, path)
	case key == "" || strings.ContainsAny(key, "\n\r"):
		return "", usageError("--ssh-key %s must hold exactly one public key line", path)
	}
	return key, nil
}

func (g *globals) lifecycleCmd(action api.Action, short string) *cobra.Command {
	c := &cobra.Command{
		Use:               string(action) + " NAME",
		Short:             short,
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
	}
	ifNeeded := ifNeededFlag(c, action)
	c.RunE = func(cmd *cobra.Command, args []string) error {
		return g.runOne(cmd.Context(), args[0], action, api.Command{}, *ifNeeded)
	}
	return c
}

// ifNeededFlag adds --if-needed to a command whose action ends in a state.
func ifNeededFlag(c *cobra.Command, action api.Action) *bool {
	var b bool
	c.Flags().BoolVar(&b, "if-needed", false, fmt.Sprintf("succeed without doing anything when the VM already is %s", doneState(action)))
	return &b
}

// doneState is the state an action ends in.
func doneState(a api.Action) api.VmState {
	switch a {
	case api.ActStart, api.ActResume:
		return api.StateRunning
	case api.ActStop:
		return api.StateStopped
	case api.ActSuspend:
		return api.StateSuspended
	case api.ActDestroy:
		return api.StateDestroyed
	}
	return ""
}

// runOne sends one command and prints its outcome; with ifNeeded, a VM
// already in the state the action ends in is a success without a command
// (the record says so; a command in flight makes it send anyway, and the
// engine decides).
func (g *globals) runOne(ctx context.Context, name string, action api.Action, cmd api.Command, ifNeeded bool) error {
	l := g.newLifecycle(name)
	if ifNeeded {
		if err := g.conn(); err != nil {
			return err
		}
		r, err := g.c.Record(ctx, name)
		switch {
		case err == nil && r.State == doneState(action) && len(r.InFlight) == 0:
			l.skip(action, fmt.Sprintf("already %s; --if-needed", r.State))
			l.doc.Record = r
			return l.done(ctx, nil)
		case errors.Is(err, client.ErrNotFound) && action == api.ActDestroy:
			l.skip(action, "no such VM; --if-exists")
			return l.done(ctx, nil)
		case err != nil && !errors.Is(err, client.ErrNotFound):
			return g.commandErr(err)
		}
	}
	_, err := l.send(ctx, action, cmd)
	return l.done(ctx, err)
}

func (g *globals) restartCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "restart NAME",
		Short: "stop a running VM (as stop does) and start it again; a stopped or prepared one is just started",
		Long: `restart is stop, then start, each waited for: the guest gets an ACPI
power-off (forced after --stop-timeout) and boots again on the same host
with the same disk. A suspended VM is not restarted (resume or stop it
first). Under --json one document lists both commands.`,
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
	}
	timeout := stopTimeoutFlag(c, "how long the guest has to power off before it is killed")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		t, err := timeout()
		if err != nil {
			return err
		}
		if g.noWait {
			return usageError("restart with --no-wait: start is sent only once stop has succeeded, so vmctl must wait for it")
		}
		if err := g.conn(); err != nil {
			return err
		}
		ctx, name := cmd.Context(), args[0]
		l := g.newLifecycle(name)
		r, err := g.c.Record(ctx, name)
		if err != nil {
			return g.commandErr(err)
		}
		if r.State == api.StateRunning {
			if _, err := l.send(ctx, api.ActStop, api.Command{TimeoutS: t}); err != nil {
				return l.done(ctx, err)
			}
		}
		_, err = l.send(ctx, api.ActStart, api.Command{})
		return l.done(ctx, err)
	}
	return c
}

// stopTimeoutFlag adds --stop-timeout (a duration) and returns a function
// giving the command's timeout_s.
func stopTimeoutFlag(c *cobra.Command, what string) func() (int, error) {
	var d time.Duration
	c.Flags().DurationVar(&d, "stop-timeout", 0, what+" (a duration such as 30s or 2m; default: the worker's, 30s)")
	return func() (int, error) {
		switch {
		case d < 0:
			return 0, usageError("--stop-timeout %s must not be negative", d)
		case d == 0:
			return 0, nil
		case d < time.Second:
			return 0, usageError("--stop-timeout %s is under the 1s resolution of the command", d)
		}
		return int(d.Round(time.Second) / time.Second), nil
	}
}

func (g *globals) stopCmd() *cobra.Command {
	c := &cobra.Command{
		Use:               "stop NAME",
		Short:             "stop a VM: ACPI power-off, then forced after --stop-timeout",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
	}
	timeout := stopTimeoutFlag(c, "how long the guest has to power off before it is killed")
	ifNeeded := ifNeededFlag(c, api.ActStop)
	c.RunE = func(cmd *cobra.Command, args []string) error {
		t, err := timeout()
		if err != nil {
			return err
		}
		return g.runOne(cmd.Context(), args[0], api.ActStop, api.Command{TimeoutS: t}, *ifNeeded)
	}
	return c
}

func (g *globals) destroyCmd() *cobra.Command {
	c := &cobra.Command{
		Use:               "destroy NAME",
		Short:             "stop a VM and remove everything it has on its host",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
	}
	timeout := stopTimeoutFlag(c, "how long a running guest has to power off before it is killed")
	var forget, ifExists bool
	c.Flags().BoolVar(&forget, "forget", false, "the VM's host is lost for good: end the VM's record without its worker (the name is free again); if the host comes back, its worker removes the VM")
	c.Flags().BoolVar(&ifExists, "if-exists", false, "succeed without doing anything when there is no such VM or it is already destroyed")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		t, err := timeout()
		if err != nil {
			return err
		}
		if forget && t != 0 {
			return usageError("--forget and --stop-timeout do not go together: a forgotten VM is not stopped, its host is gone")
		}
		return g.runOne(cmd.Context(), args[0], api.ActDestroy, api.Command{TimeoutS: t, Forget: forget}, ifExists)
	}
	return c
}

// migrateCmd moves a VM to another host, or cancels its migration.
func (g *globals) migrateCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "migrate NAME",
		Short: "move a VM to another host: live if it runs or is suspended, cold if it is prepared or stopped",
		Long: `Move a VM to another host. A running or suspended VM moves live (its disk
and memory; it keeps running, or stays suspended); a prepared or stopped
one moves cold (its disk). Without --to, the destination is placed as a
prepare would be, among the other hosts. The VM's host changes in one
stored event (migrated); until then the VM runs where it was, and a
migration that fails or is cancelled leaves it there.`,
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
	}
	var to string
	var cancel bool
	var timeout time.Duration
	c.Flags().StringVar(&to, "to", "", "the destination host (default: placed)")
	c.Flags().BoolVar(&cancel, "cancel", false, "cancel the VM's migration in flight; it stays where it is")
	c.Flags().DurationVar(&timeout, "migration-timeout", 0, "bound the whole migration (default: the worker's stall bound only)")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		if cancel && (to != "" || timeout != 0) {
			return usageError("--cancel takes no --to or --migration-timeout")
		}
		if timeout < 0 || (timeout > 0 && timeout < time.Second) {
			return usageError("--migration-timeout %s: at least 1s", timeout)
		}
		return g.runOne(cmd.Context(), args[0], api.ActMigrate, api.Command{Host: to, Cancel: cancel, TimeoutS: int(timeout / time.Second)}, false)
	}
	return c
}

// completeNames completes VM names from the records bucket.
func (g *globals) completeNames(cmd *cobra.Command, args []string, prefix string) ([]cobra.Completion, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	if err := g.conn(); err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Second)
	defer cancel()
	kv, err := g.js.KeyValue(ctx, g.names.RecordsBucket())
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
	}
	es, err := events.KVEntries(ctx, g.js, kv.Bucket(), "")
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
	}
	var names []cobra.Completion
	for _, e := range es {
		if k := e.Key(); strings.HasPrefix(k, prefix) {
			names = append(names, k)
		}
	}
	sort.Strings(names)
	return names, cobra.ShellCompDirectiveNoFileComp
}

func (g *globals) record(ctx context.Context, name string) (*api.VmRecord, error) {
	if err := api.ValidateName(name); err != nil {
		return nil, usageError("NAME %q: %s", name, ruleOf(err))
	}
	if err := g.conn(); err != nil {
		return nil, err
	}
	r, err := g.c.Record(ctx, name)
	if errors.Is(err, client.ErrNotFound) {
		return nil, &exitError{code: ExitFailed, kind: "not_found", msg: fmt.Sprintf("no VM named %s (`vmctl list` shows the VMs)", name), err: err}
	}
	return r, g.commandErr(err)
}

// listed is a record as `vmctl list --json` prints it: with whether its
// host is lost now (the record is then the last state known).
type listed struct {
	*api.VmRecord
	HostLost bool `json:"host_lost,omitempty"`
}

// stateText is the state as people read it: a VM whose process ended
// without a command is "stopped (exited)", not a clean stop; on a lost
// host the state is the last one known: "unknown (host lost; last running)".
func stateText(r *api.VmRecord, hostLost bool) string {
	s := string(r.State)
	if r.Crashed() {
		s += " (exited)"
	}
	if hostLost && r.State != api.StateDestroyed {
		return "unknown (host lost; last " + s + ")"
	}
	return s
}

// running reports whether the record says the VM's process runs.
func running(r *api.VmRecord) bool {
	return r.State == api.StateRunning || r.State == api.StateSuspended
}

// notRunning is the error for a query that needs a running VM.
func notRunning(r *api.VmRecord) error {
	msg := fmt.Sprintf("vm %s is not running (state %s)", r.Name, r.State)
	if r.Crashed() {
		msg = fmt.Sprintf("vm %s is not running: its process exited at %s without a command (%s)", r.Name,
			r.Exit.Time.Local().Format(time.DateTime), r.Exit.Reason)
	}
	switch r.State {
	case api.StatePrepared, api.StateStopped, api.StateFailed:
		msg += fmt.Sprintf("; start it with `vmctl start %s`", r.Name)
	}
	return &exitError{code: ExitFailed, msg: msg}
}

func (g *globals) listCmd() *cobra.Command {
	var all bool
	c := &cobra.Command{
		Use:   "list",
		Short: "list VMs from the VM_RECORDS projection, with their guest address",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.conn(); err != nil {
				return err
			}
			recs, err := projection.Load(cmd.Context(), g.js, g.names)
			if err != nil {
				return err
			}
			var list []*api.VmRecord
			for _, r := range recs {
				if all || r.State != api.StateDestroyed {
					list = append(list, r)
				}
			}
			sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
			lost := g.lostHosts(cmd.Context())
			if g.json {
				out := make([]listed, len(list))
				for i, r := range list {
					out[i] = listed{VmRecord: r, HostLost: lost[r.Host] && r.State != api.StateDestroyed}
				}
				return g.printJSON(out)
			}
			ips := g.guestAddrs(cmd.Context(), list, lost)
			tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSTATE\tHOST\tBACKEND\tVCPUS\tMEMORY\tIP\tIN FLIGHT\tUPDATED")
			for i, r := range list {
				var inflight []string
				for _, f := range r.InFlight {
					inflight = append(inflight, string(f.Action))
				}
				vcpus, mem := "-", "-"
				if r.Handle != nil && r.Handle.Spec != nil {
					vcpus = strconv.Itoa(r.Handle.Spec.Vcpus)
					mem = strconv.Itoa(r.Handle.Spec.MemoryMB) + "M"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Name, stateText(r, lost[r.Host]), r.Host, r.Backend,
					vcpus, mem, ips[i], orDash(strings.Join(inflight, ",")), r.UpdatedAt.Local().Format(time.DateTime))
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&all, "all", false, "include destroyed VMs")
	return c
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// guestAddrs asks the workers for the address of each running VM, at once
// and briefly: a list must not hang on one slow host.
func (g *globals) guestAddrs(ctx context.Context, list []*api.VmRecord, lost map[string]bool) []string {
	out := make([]string, len(list))
	var wg sync.WaitGroup
	for i, r := range list {
		out[i] = "-"
		if !running(r) || r.Host == "" {
			continue
		}
		if lost[r.Host] {
			out[i] = "?"
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			qctx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			var ip api.GuestIPReply
			var we *client.WorkerError
			if err := g.query(qctx, r, "guest_ip", &ip); errors.As(err, &we) && we.Code == "409" {
				return // the VM has no address (no network, or not known yet)
			} else if err != nil || ip.IP == "" {
				out[i] = "?" // the worker did not answer
				return
			}
			out[i] = ip.IP
			if ip.Port != 0 {
				out[i] = net.JoinHostPort(ip.IP, strconv.Itoa(ip.Port))
			}
		}()
	}
	wg.Wait()
	return out
}

// query asks the worker on the VM's host.
func (g *globals) query(ctx context.Context, r *api.VmRecord, endpoint string, out any) error {
	return g.c.QueryHost(ctx, r.Host, r.Name, endpoint, out)
}

func (g *globals) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "status NAME",
		Short:             "show a VM's record and its live state from the worker",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := g.record(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			var live api.StateReply
			liveErr := error(nil)
			hostLost := r.State != api.StateDestroyed && g.hostLost(cmd.Context(), r.Host)
			switch {
			case hostLost:
				liveErr = fmt.Errorf("host %s is lost (no heartbeat for over %s)", r.Host, hosts.DefaultLostAfter)
			case r.State != api.StateDestroyed:
				liveErr = g.query(cmd.Context(), r, "state", &live)
			}
			if g.json {
				out := map[string]any{"record": r}
				if hostLost {
					out["host_lost"] = true
				}
				if liveErr == nil && live.State != "" {
					out["live"] = live
				} else if liveErr != nil {
					out["live_error"] = liveErr.Error()
				}
				return g.printJSON(out)
			}
			tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "name:\t%s\n", r.Name)
			fmt.Fprintf(tw, "state:\t%s\n", stateText(r, hostLost))
			if r.Crashed() {
				fmt.Fprintf(tw, "exited:\tat %s without a command: %s\n", r.Exit.Time.Local().Format(time.RFC3339), r.Exit.Reason)
			}
			switch {
			case liveErr != nil:
				fmt.Fprintf(tw, "live state:\tunknown (%v)\n", liveErr)
			case live.State != "":
				fmt.Fprintf(tw, "live state:\t%s\n", live.State)
			}
			fmt.Fprintf(tw, "host:\t%s\n", r.Host)
			fmt.Fprintf(tw, "backend:\t%s\n", r.Backend)
			for _, f := range r.InFlight {
				fmt.Fprintf(tw, "in flight:\t%s (%s)\n", f.Action, f.CommandID)
			}
			if h := r.Handle; h != nil {
				fmt.Fprintf(tw, "handle:\t%s\n", h.ID)
				if s := h.Spec; s != nil {
					fmt.Fprintf(tw, "vcpus:\t%d\n", s.Vcpus)
					fmt.Fprintf(tw, "memory:\t%d MiB\n", s.MemoryMB)
				}
				// Process details only while it runs: after a stop they
				// are stale (the forwarded port may belong to another VM).
				if running(r) {
					if h.PID != 0 {
						fmt.Fprintf(tw, "pid:\t%d\n", h.PID)
					}
					if h.Accel != "" {
						fmt.Fprintf(tw, "accel:\t%s\n", h.Accel)
					}
					if h.VNC != "" {
						fmt.Fprintf(tw, "vnc:\t%s\n", h.VNC)
					}
					if h.SSHPort != 0 {
						fmt.Fprintf(tw, "ssh:\t127.0.0.1:%d (on host %s)\n", h.SSHPort, r.Host)
					}
				} else {
					fmt.Fprintf(tw, "process:\tnot running\n")
				}
			}
			if r.LastError != "" {
				fmt.Fprintf(tw, "last error:\t%s\n", r.LastError)
			}
			fmt.Fprintf(tw, "generation:\t%d\n", r.Generation)
			fmt.Fprintf(tw, "last event:\t%s (seq %d) at %s\n", r.LastEvent, r.LastSeq, r.UpdatedAt.Local().Format(time.RFC3339))
			return tw.Flush()
		},
	}
}

func (g *globals) ipCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "ip NAME",
		Short:             "print the guest's address (user networking: 127.0.0.1 and the forwarded SSH port on the VM's host)",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := g.record(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if !running(r) {
				return notRunning(r)
			}
			var ip api.GuestIPReply
			if err := g.query(cmd.Context(), r, "guest_ip", &ip); err != nil {
				return err
			}
			if g.json {
				return g.printJSON(ip)
			}
			if ip.Port != 0 {
				fmt.Fprintf(g.out, "%s port %d (ssh -p %d <user>@%s)\n", ip.IP, ip.Port, ip.Port, ip.IP)
			} else {
				fmt.Fprintln(g.out, ip.IP)
			}
			return nil
		},
	}
}

func (g *globals) eventsCmd() *cobra.Command {
	var follow bool
	var last int
	c := &cobra.Command{
		Use:               "events [NAME]",
		Short:             "print events (of one VM, or all), and with --follow keep printing new ones",
		ValidArgsFunction: g.completeNames,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return nil
			}
			return nameArg(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 1 {
				return g.vmEvents(cmd.Context(), args[0], follow, last, false)
			}
			return g.allEvents(cmd.Context(), follow, last)
		},
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new events")
	c.Flags().IntVar(&last, "last", 0, "start with the last N events (0: all)")
	return c
}

func (g *globals) historyCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "history NAME",
		Short:             "print every event of one VM, oldest first",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.vmEvents(cmd.Context(), args[0], false, 0, true)
		},
	}
}

// eventPrinter prints events as text lines, or JSON: one document per
// event when following, else one list at the end.
type eventPrinter struct {
	g      *globals
	follow bool
	list   []any
}

func (g *globals) newEventPrinter(follow bool) *eventPrinter {
	return &eventPrinter{g: g, follow: follow, list: []any{}}
}

func (p *eventPrinter) add(ev any, text string) {
	switch {
	case !p.g.json:
		fmt.Fprintln(p.g.out, text)
	case p.follow:
		b, _ := json.Marshal(ev)
		fmt.Fprintln(p.g.out, string(b))
	default:
		p.list = append(p.list, ev)
	}
}

func (p *eventPrinter) done() error {
	if p.g.json && !p.follow {
		return p.g.printJSON(p.list)
	}
	return nil
}

// vmEvents prints one VM's events (the last N if last > 0, with their
// stream sequences if withSeq) and, when following, those stored after
// them until ctx ends. It reads by direct gets and leaves no consumer on
// the server.
func (g *globals) vmEvents(ctx context.Context, name string, follow bool, last int, withSeq bool) error {
	if err := g.conn(); err != nil {
		return err
	}
	store, err := events.NewStore(ctx, g.js, g.names, "")
	if err != nil {
		return err
	}
	p := g.newEventPrinter(follow)
	show := func(s events.Stored) bool {
		if s.Event == nil {
			return true // undecodable: skipped, as the fold skips it
		}
		seq := uint64(0)
		if withSeq {
			seq = s.Seq
		}
		p.add(s.Event, formatEvent(seq, s.Event))
		return true
	}
	evs, err := store.ReadVM(ctx, name, 1)
	if err != nil {
		return fmt.Errorf("reading %s's events: %w", name, err)
	}
	from := uint64(1)
	if len(evs) > 0 {
		from = evs[len(evs)-1].Seq + 1
	}
	if last > 0 && len(evs) > last {
		evs = evs[len(evs)-last:]
	}
	for _, s := range evs {
		show(s)
	}
	if !follow {
		return p.done()
	}
	if err := store.FollowVM(ctx, name, from, show); err != nil && ctx.Err() == nil {
		return fmt.Errorf("reading %s's events: %w", name, err)
	}
	return nil
}

// allEvents prints every event in the stream, the VMs' and the hosts'
// (the last N if last > 0), and when following the new ones until ctx
// ends. A whole-stream read is what a consumer is for, so it uses an
// ordered one, and deletes it when it ends; if vmctl dies first, the
// server drops it after events.ReaderIdle.
func (g *globals) allEvents(ctx context.Context, follow bool, last int) error {
	if err := g.conn(); err != nil {
		return err
	}
	st, err := g.js.Stream(ctx, g.names.EventsStream())
	if err != nil {
		return fmt.Errorf("opening %s: %w", g.names.EventsStream(), err)
	}
	pending := st.CachedInfo().State.Msgs
	skip := uint64(0)
	if last > 0 && pending > uint64(last) {
		skip = pending - uint64(last)
	}
	p := g.newEventPrinter(follow)
	if pending == 0 && !follow {
		return p.done()
	}
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects:    []string{g.names.Events(), g.names.HostEvents()},
		InactiveThreshold: events.ReaderIdle,
	})
	if err != nil {
		return err
	}
	defer events.DropConsumer(st, cons)
	it, err := cons.Messages()
	if err != nil {
		return err
	}
	defer it.Stop()
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	for seen := uint64(0); follow || seen < pending; {
		m, err := it.Next()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if seen++; seen <= skip {
			continue
		}
		if _, _, isHost := g.names.ParseHostEventSubject(m.Subject()); isHost {
			if hev, err := api.DecodeHostEvent(m.Data()); err == nil {
				p.add(hev, formatHostEvent(0, hev))
			}
		} else if ev, err := events.Decode(m.Data()); err == nil {
			p.add(ev, formatEvent(0, ev))
		}
	}
	return p.done()
}

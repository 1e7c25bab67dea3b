package vmctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/hosts"
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
	recs, err := g.c.Records(ctx)
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
	}
	var names []cobra.Completion
	for _, r := range recs {
		// Destroyed VMs are no names to act on (their records stay until
		// purged).
		if r.Live() && strings.HasPrefix(r.Name, prefix) {
			names = append(names, r.Name)
		}
	}
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
// host is lost now (the record is then the last state known) and the
// guest's address when the worker gave one.
type listed struct {
	*api.VmRecord
	HostLost bool   `json:"host_lost,omitempty"`
	IP       string `json:"ip,omitempty"`
}

// stateText is the state as people read it: a VM whose process ended
// without a command is "stopped (exited)", not a clean stop; on a lost
// host the state is the last one known: "unknown (host lost; last running)".
func stateText(r *api.VmRecord, hostLost bool) string {
	s := string(r.State)
	if r.Crashed() {
		s += " (exited)"
	}
	if hostLost && r.Live() {
		return "unknown (host lost; last " + s + ")"
	}
	return s
}

// running reports whether the record says the VM's process runs.
func running(r *api.VmRecord) bool { return fsm.Live(r.State) }

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
	return &exitError{code: ExitFailed, kind: "not_running", msg: msg}
}

// listColumns are the columns list can print, in their default order.
var listColumns = []string{"name", "state", "host", "backend", "vcpus", "memory", "ip", "in-flight", "updated"}

func (g *globals) listCmd() *cobra.Command {
	var (
		all            bool
		states, hostsF []string
		format         string
		columns        []string
	)
	c := &cobra.Command{
		Use:   "list",
		Short: "list VMs from the VM_RECORDS projection, with their guest address",
		Long: `list prints the VMs' records (destroyed ones only with --all), filtered by
--state and --host (each repeatable or comma-separated; a VM must match one
value of every filter given).

--format table (default) prints the --columns chosen; json one document, an
array of records each with host_lost and ip; jsonl one record per line; name
only the names, one per line (for xargs). --json is --format json.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if g.json && !cmd.Flags().Changed("format") {
				format = "json"
			}
			switch format {
			case "table", "json", "jsonl", "name":
			default:
				return usageError("--format %q: want table, json, jsonl or name", format)
			}
			for _, col := range columns {
				if !slices.Contains(listColumns, col) {
					return usageError("--columns: %q is not one of %s", col, strings.Join(listColumns, ","))
				}
			}
			for _, st := range states {
				if !slices.Contains(fsm.States(), api.VmState(st)) {
					return usageError("--state %q is not a state (%s)", st, joinStates(fsm.States()))
				}
			}
			if err := g.conn(); err != nil {
				return err
			}
			ctx := cmd.Context()
			recs, err := g.c.Records(ctx)
			if err != nil {
				return g.commandErr(err)
			}
			var list []*api.VmRecord
			for _, r := range recs {
				switch {
				case !all && !r.Live() && !slices.Contains(states, string(api.StateDestroyed)):
				case len(states) > 0 && !slices.Contains(states, string(r.State)):
				case len(hostsF) > 0 && !slices.Contains(hostsF, r.Host):
				default:
					list = append(list, r)
				}
			}
			if format == "name" {
				for _, r := range list {
					fmt.Fprintln(g.out, r.Name)
				}
				return nil
			}
			lost := g.lostHosts(ctx)
			ips := g.guestAddrs(ctx, list, lost)
			if format == "json" || format == "jsonl" {
				out := make([]listed, len(list))
				for i, r := range list {
					out[i] = listed{VmRecord: r, HostLost: lost[r.Host] && r.Live()}
					if ip := ips[i]; ip != "-" && ip != "?" {
						out[i].IP = ip
					}
				}
				if format == "json" {
					return g.printJSON(out)
				}
				for _, l := range out {
					b, _ := json.Marshal(l)
					fmt.Fprintln(g.out, string(b))
				}
				return nil
			}
			if len(columns) == 0 {
				columns = listColumns
			}
			tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
			head := make([]string, len(columns))
			for i, col := range columns {
				head[i] = strings.ToUpper(strings.ReplaceAll(col, "-", " "))
			}
			fmt.Fprintln(tw, strings.Join(head, "\t"))
			for i, r := range list {
				row := make([]string, len(columns))
				for j, col := range columns {
					row[j] = listCell(r, col, ips[i], lost[r.Host])
				}
				fmt.Fprintln(tw, strings.Join(row, "\t"))
			}
			return tw.Flush()
		},
	}
	f := c.Flags()
	f.BoolVar(&all, "all", false, "include destroyed VMs")
	f.StringSliceVar(&states, "state", nil, "only VMs in these states (e.g. running,stopped)")
	f.StringSliceVar(&hostsF, "host", nil, "only VMs on these hosts")
	f.StringVar(&format, "format", "table", "table, json, jsonl or name")
	f.StringSliceVar(&columns, "columns", nil, "table columns, from "+strings.Join(listColumns, ","))
	_ = c.RegisterFlagCompletionFunc("state", func(*cobra.Command, []string, string) ([]cobra.Completion, cobra.ShellCompDirective) {
		var out []cobra.Completion
		for _, s := range fsm.States() {
			out = append(out, string(s))
		}
		return out, cobra.ShellCompDirectiveNoFileComp
	})
	_ = c.RegisterFlagCompletionFunc("host", g.completeHosts)
	return c
}

// listCell is one cell of list's table.
func listCell(r *api.VmRecord, col, ip string, hostLost bool) string {
	switch col {
	case "name":
		return r.Name
	case "state":
		return stateText(r, hostLost)
	case "host":
		return orDash(r.Host)
	case "backend":
		return orDash(string(r.Backend))
	case "vcpus":
		if r.Handle != nil && r.Handle.Spec != nil {
			return strconv.Itoa(r.Handle.Spec.Vcpus)
		}
	case "memory":
		if r.Handle != nil && r.Handle.Spec != nil {
			return strconv.Itoa(r.Handle.Spec.MemoryMB) + "M"
		}
	case "ip":
		return ip
	case "in-flight":
		var inflight []string
		for _, f := range r.InFlight {
			inflight = append(inflight, string(f.Action))
		}
		return orDash(strings.Join(inflight, ","))
	case "updated":
		return r.UpdatedAt.Local().Format(time.DateTime)
	}
	return "-"
}

func joinStates(ss []api.VmState) string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = string(s)
	}
	return strings.Join(out, ", ")
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
			hostLost := r.Live() && g.hostLost(cmd.Context(), r.Host)
			switch {
			case hostLost:
				liveErr = fmt.Errorf("host %s is lost (no heartbeat for over %s)", r.Host, hosts.DefaultLostAfter)
			case r.Live():
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
					// What the backend shows of its data (accel,
					// vnc, ssh...), which only it reads.
					for _, k := range slices.Sorted(maps.Keys(live.Details)) {
						fmt.Fprintf(tw, "%s:\t%s\n", k, live.Details[k])
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
	var host string
	c := &cobra.Command{
		Use:   "events [NAME]",
		Short: "print events (of one VM, one host, or all), and with --follow keep printing new ones",
		Long: `events prints the events the stream keeps, oldest first: one VM's (NAME),
those about one host (--host: its host events and the VMs' events it wrote
or that place a VM on it), or all. --follow keeps printing new ones; it
reads without a consumer, and keeps its place when the connection or the
server goes away for a while (it says so on stderr).

--json prints one array of events, each with its stream sequence (seq);
with --follow one event per line (JSON lines), as they come.`,
		ValidArgsFunction: g.completeNames,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return nil
			}
			return nameArg(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if last < 0 {
				return usageError("--last %d: give a number of events", last)
			}
			o := client.WatchOptions{Host: host}
			if len(args) == 1 {
				if host != "" {
					return usageError("give NAME or --host, not both")
				}
				o.VM = args[0]
			}
			return g.printEvents(cmd.Context(), o, follow, last, true)
		},
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new events")
	c.Flags().IntVar(&last, "last", 0, "start with the last N events (0: all)")
	c.Flags().StringVar(&host, "host", "", "only events about this host")
	_ = c.RegisterFlagCompletionFunc("host", g.completeHosts)
	return c
}

func (g *globals) historyCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "history NAME",
		Short:             "print every event of one VM, oldest first, with its stream sequence",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.printEvents(cmd.Context(), client.WatchOptions{VM: args[0]}, false, 0, true)
		},
	}
}

// storedJSON is an event as --json prints it: its fields and its stream
// sequence (a host event's fields, for those).
type storedJSON struct {
	Seq uint64 `json:"seq"`
	*api.Event
	*api.HostEvent
}

func (st storedJSON) MarshalJSON() ([]byte, error) {
	var body []byte
	var err error
	if st.Event != nil {
		body, err = json.Marshal(st.Event)
	} else {
		body, err = json.Marshal(st.HostEvent)
	}
	if err != nil || len(body) < 2 || body[0] != '{' {
		return body, err
	}
	sep := ","
	if len(body) == 2 {
		sep = ""
	}
	return []byte(fmt.Sprintf(`{"seq":%d%s%s`, st.Seq, sep, body[1:])), nil
}

// printEvents prints the events o selects: the last N (0: all) of those
// stored now, then, following, the new ones until ctx ends. Under --json:
// one array, or one line per event when following.
func (g *globals) printEvents(ctx context.Context, o client.WatchOptions, follow bool, last int, withSeq bool) error {
	if o.VM != "" {
		if err := api.ValidateName(o.VM); err != nil {
			return usageError("NAME %q: %s", o.VM, ruleOf(err))
		}
	}
	if err := g.conn(); err != nil {
		return err
	}
	end, err := g.c.LastSeq(ctx)
	if err != nil {
		return g.commandErr(err)
	}
	var list []client.Stored
	if end > 0 {
		ro := o
		ro.History, ro.Until = true, end
		for st, err := range g.c.Watch(ctx, ro) {
			if err != nil {
				return g.commandErr(err)
			}
			list = append(list, st)
		}
	}
	if last > 0 && len(list) > last {
		list = list[len(list)-last:]
	}
	show := func(st client.Stored) {
		seq := uint64(0)
		if withSeq {
			seq = st.Seq
		}
		switch {
		case !g.json && st.HostEvent != nil:
			fmt.Fprintln(g.out, formatHostEvent(seq, st.HostEvent))
		case !g.json:
			fmt.Fprintln(g.out, formatEvent(seq, st.Event))
		default:
			b, _ := json.Marshal(storedJSON{Seq: st.Seq, Event: st.Event, HostEvent: st.HostEvent})
			fmt.Fprintln(g.out, string(b))
		}
	}
	if g.json && !follow {
		out := make([]storedJSON, len(list))
		for i, st := range list {
			out[i] = storedJSON{Seq: st.Seq, Event: st.Event, HostEvent: st.HostEvent}
		}
		return g.printJSON(out)
	}
	for _, st := range list {
		show(st)
	}
	if !follow {
		return nil
	}
	// Following: say on stderr when the connection is down, and when it
	// is back (the watch itself keeps its place).
	p := g.newProgress("events")
	p.waitingFor("new events")
	var mu sync.Mutex
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
			}
			why := ""
			if down := g.c.DownSince(); !down.IsZero() {
				why = fmt.Sprintf("the connection to NATS is down since %s; reconnecting", down.Format("15:04:05"))
			}
			mu.Lock()
			p.trouble(why)
			mu.Unlock()
		}
	}()
	o.From = end + 1
	for st, err := range g.c.Watch(wctx, o) {
		if err != nil {
			return g.commandErr(err)
		}
		mu.Lock()
		show(st)
		mu.Unlock()
	}
	return nil
}

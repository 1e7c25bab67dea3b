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

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/vm"
)

func (g *globals) createCmd() *cobra.Command {
	var (
		spec                      vm.VmSpec
		network, bridge           string
		cloudInit, sshKey, netCfg string
		host, backend             string
		start                     bool
		sshUser                   string
		labels                    []string
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
			spec.Backend = vm.BackendTag(backend)
			if spec.ImagePath != "" && !strings.Contains(spec.ImagePath, "/") {
				// A name in the hosts' image stores, not a path.
				spec.Image, spec.ImagePath = spec.ImagePath, ""
			}
			n := &vm.NetworkConfig{Type: vm.NetworkType(network)}
			if t, arg, ok := strings.Cut(network, ":"); ok {
				n.Type = vm.NetworkType(t)
				switch n.Type {
				case vm.NetworkTap:
					n.Bridge = arg
				case vm.NetworkVnic:
					n.Name = arg
				}
			}
			if bridge != "" {
				n.Bridge = bridge
			}
			spec.Network = n
			if cloudInit != "" || netCfg != "" {
				spec.CloudInit = &vm.CloudInitConfig{}
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
				spec.SSH = &vm.SshConfig{User: sshUser, PublicKey: key}
			}
			var err error
			if spec.Labels, err = parseLabels(labels); err != nil {
				return err
			}
			if err := spec.Validate(); err != nil {
				return usageError("%s", flagWords(err.Error()))
			}
			ctx := cmd.Context()
			ev, err := g.send(ctx, spec.Name, fsm.ActPrepare, events.Command{Spec: &spec, Host: host})
			if err != nil || !start || ev == nil {
				return err
			}
			_, err = g.send(ctx, spec.Name, fsm.ActStart, events.Command{})
			return err
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
	f.StringArrayVar(&labels, "label", nil, "a label KEY=VALUE to set on the VM (repeatable; metadata only, `vmctl list --label` filters by it; the guest never sees it)")
	return c
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

func (g *globals) lifecycleCmd(action fsm.Action, short string) *cobra.Command {
	return &cobra.Command{
		Use:               string(action) + " NAME",
		Short:             short,
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			_, err := g.send(cmd.Context(), args[0], action, events.Command{})
			return err
		},
	}
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
	c.RunE = func(cmd *cobra.Command, args []string) error {
		t, err := timeout()
		if err != nil {
			return err
		}
		_, err = g.send(cmd.Context(), args[0], fsm.ActStop, events.Command{TimeoutS: t})
		return err
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
	var forget bool
	c.Flags().BoolVar(&forget, "forget", false, "the VM's host is lost for good: end the VM's record without its worker (the name is free again); if the host comes back, its worker removes the VM")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		t, err := timeout()
		if err != nil {
			return err
		}
		if forget && t != 0 {
			return usageError("--forget and --stop-timeout do not go together: a forgotten VM is not stopped, its host is gone")
		}
		_, err = g.send(cmd.Context(), args[0], fsm.ActDestroy, events.Command{TimeoutS: t, Forget: forget})
		return err
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
		_, err := g.send(cmd.Context(), args[0], fsm.ActMigrate, events.Command{Host: to, Cancel: cancel, TimeoutS: int(timeout / time.Second)})
		return err
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

// recordsKV opens VM_RECORDS once per run: awaitRecord reads a record
// again and again, and drain's stops wait in parallel.
func (g *globals) recordsKV(ctx context.Context) (jetstream.KeyValue, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.records == nil {
		kv, err := g.js.KeyValue(ctx, g.names.RecordsBucket())
		if err != nil {
			return nil, fmt.Errorf("opening %s: %w (has the engine ever run on this server?)", g.names.RecordsBucket(), err)
		}
		g.records = kv
	}
	return g.records, nil
}

func (g *globals) record(ctx context.Context, name string) (*projection.VmRecord, error) {
	if err := vm.ValidateName(name); err != nil {
		return nil, usageError("NAME %q: %s", name, ruleOf(err))
	}
	if err := g.conn(); err != nil {
		return nil, err
	}
	kv, err := g.recordsKV(ctx)
	if err != nil {
		return nil, err
	}
	e, err := kv.Get(ctx, name)
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil, &exitError{code: ExitFailed, msg: fmt.Sprintf("no VM named %s (`vmctl list` shows the VMs)", name)}
		}
		return nil, err
	}
	return projection.Unmarshal(e.Value())
}

// listed is a record as `vmctl list --json` prints it: with whether its
// host is lost now (the record is then the last state known).
type listed struct {
	*projection.VmRecord
	HostLost bool `json:"host_lost,omitempty"`
}

// stateText is the state as people read it: a VM whose process ended
// without a command is "stopped (exited)", not a clean stop; on a lost
// host the state is the last one known: "unknown (host lost; last running)".
func stateText(r *projection.VmRecord, hostLost bool) string {
	s := string(r.State)
	if r.Crashed() {
		s += " (exited)"
	}
	if hostLost && r.State != vm.StateDestroyed {
		return "unknown (host lost; last " + s + ")"
	}
	return s
}

// running reports whether the record says the VM's process runs.
func running(r *projection.VmRecord) bool {
	return r.State == vm.StateRunning || r.State == vm.StateSuspended
}

// notRunning is the error for a query that needs a running VM.
func notRunning(r *projection.VmRecord) error {
	msg := fmt.Sprintf("vm %s is not running (state %s)", r.Name, r.State)
	if r.Crashed() {
		msg = fmt.Sprintf("vm %s is not running: its process exited at %s without a command (%s)", r.Name,
			r.Exit.Time.Local().Format(time.DateTime), r.Exit.Reason)
	}
	switch r.State {
	case vm.StatePrepared, vm.StateStopped, vm.StateFailed:
		msg += fmt.Sprintf("; start it with `vmctl start %s`", r.Name)
	}
	return &exitError{code: ExitFailed, msg: msg}
}

func (g *globals) listCmd() *cobra.Command {
	var (
		all    bool
		labels []string
	)
	c := &cobra.Command{
		Use:   "list",
		Short: "list VMs from the VM_RECORDS projection, with their guest address",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			sel, err := parseSelector(labels)
			if err != nil {
				return err
			}
			if err := g.conn(); err != nil {
				return err
			}
			recs, err := projection.Load(cmd.Context(), g.js, g.names)
			if err != nil {
				return err
			}
			var list []*projection.VmRecord
			for _, r := range recs {
				if (all || r.State != vm.StateDestroyed) && sel.matches(r) {
					list = append(list, r)
				}
			}
			sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
			lost := g.lostHosts(cmd.Context())
			if g.json {
				out := make([]listed, len(list))
				for i, r := range list {
					out[i] = listed{VmRecord: r, HostLost: lost[r.Host] && r.State != vm.StateDestroyed}
				}
				return g.printJSON(out)
			}
			ips := g.guestAddrs(cmd.Context(), list, lost)
			tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSTATE\tHOST\tBACKEND\tVCPUS\tMEMORY\tIP\tIN FLIGHT\tUPDATED\tLABELS")
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
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Name, stateText(r, lost[r.Host]), r.Host, r.Backend,
					vcpus, mem, ips[i], orDash(strings.Join(inflight, ",")), r.UpdatedAt.Local().Format(time.DateTime), formatLabels(r.Labels))
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&all, "all", false, "include destroyed VMs")
	c.Flags().StringArrayVar(&labels, "label", nil, "only VMs with this label: KEY=VALUE, or KEY for any value (repeatable: all must match)")
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
func (g *globals) guestAddrs(ctx context.Context, list []*projection.VmRecord, lost map[string]bool) []string {
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
			var ip events.GuestIPReply
			var qe *queryError
			if err := g.query(qctx, r, "guest_ip", &ip); errors.As(err, &qe) && qe.code == "409" {
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

// queryError is a worker's answer that it cannot answer: code 404 (no such
// VM), 409 (no address, unsupported) or 500, as the micro service sends it.
type queryError struct{ code, msg string }

func (e *queryError) Error() string { return e.msg }

// query asks the worker on the VM's host.
func (g *globals) query(ctx context.Context, r *projection.VmRecord, endpoint string, out any) error {
	req, _ := json.Marshal(events.QueryRequest{VM: r.Name})
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	m, err := g.nc.RequestWithContext(qctx, g.names.Query(r.Host)+"."+endpoint, req)
	if err != nil {
		return fmt.Errorf("asking the worker on host %s: %w (is it running?)", r.Host, err)
	}
	if code := m.Header.Get("Nats-Service-Error-Code"); code != "" {
		return &queryError{code: code, msg: fmt.Sprintf("worker on host %s: %s", r.Host, m.Header.Get("Nats-Service-Error"))}
	}
	return json.Unmarshal(m.Data, out)
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
			var live events.StateReply
			liveErr := error(nil)
			hostLost := r.State != vm.StateDestroyed && g.hostLost(cmd.Context(), r.Host)
			switch {
			case hostLost:
				liveErr = fmt.Errorf("host %s is lost (no heartbeat for over %s)", r.Host, hosts.DefaultLostAfter)
			case r.State != vm.StateDestroyed:
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
			if len(r.Labels) > 0 {
				fmt.Fprintf(tw, "labels:\t%s\n", formatLabels(r.Labels))
			}
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
			var ip events.GuestIPReply
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
			if hev, err := events.DecodeHostEvent(m.Data()); err == nil {
				p.add(hev, formatHostEvent(0, hev))
			}
		} else if ev, err := events.Decode(m.Data()); err == nil {
			p.add(ev, formatEvent(0, ev))
		}
	}
	return p.done()
}

package vmctl

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/fsm"
)

// hostRow is a host as `vmctl hosts` shows it: its heartbeat and cordon,
// and what the records place on it.
type hostRow struct {
	*api.Host
	Status string `json:"status"`
	// VMs counts the VMs (not destroyed) the records place on the host
	// (placed_vms: the heartbeat's usage.vms is what the worker itself
	// counts, which can differ while commands are in flight); Placed is
	// what the non-Noop ones take (what placement counts).
	VMs    int           `json:"placed_vms"`
	Placed api.Resources `json:"placed"`
	// Leaving and Arriving count the VMs migrating off and onto the
	// host now (a drain's progress).
	Leaving  int `json:"leaving"`
	Arriving int `json:"arriving"`
}

// fleet reads the hosts and the records once.
func (g *globals) fleet(ctx context.Context) ([]*api.Host, map[string]*api.VmRecord, error) {
	if err := g.conn(); err != nil {
		return nil, nil, err
	}
	hs, err := g.c.Hosts(ctx)
	if err != nil {
		return nil, nil, g.commandErr(err)
	}
	list, err := g.c.Records(ctx)
	if err != nil {
		return nil, nil, g.commandErr(err)
	}
	recs := make(map[string]*api.VmRecord, len(list))
	for _, r := range list {
		recs[r.Name] = r
	}
	return hs, recs, nil
}

// onHost lists the VMs (not destroyed) the records place on host, by name.
func onHost(recs map[string]*api.VmRecord, host string) []*api.VmRecord {
	var out []*api.VmRecord
	for _, r := range recs {
		if r.Host == host && r.Live() {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (g *globals) hostsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "hosts",
		Short: "list the hosts: alive, lost or cordoned, backends, capacity, placed VMs, version, last heartbeat",
		Args:  noArgs,
		RunE:  g.listHosts,
	}
}

func (g *globals) listHosts(cmd *cobra.Command, _ []string) error {
	hs, recs, err := g.fleet(cmd.Context())
	if err != nil {
		return err
	}
	rows := make([]hostRow, 0, len(hs))
	for _, h := range hs {
		row := hostRow{Host: h, Status: h.Status()}
		for _, r := range recs {
			if m := r.Migration; m != nil && r.State == api.StateMigrating {
				if m.From == h.Host {
					row.Leaving++
				}
				if m.To == h.Host {
					row.Arriving++
				}
			}
		}
		for _, r := range onHost(recs, h.Host) {
			row.VMs++
			if r.Backend != api.BackendNoop {
				row.Placed = row.Placed.Add(api.Resources{Vcpus: r.Vcpus, MemoryMB: r.MemoryMB})
			}
		}
		rows = append(rows, row)
	}
	if g.json {
		return g.printJSON(rows)
	}
	if len(rows) == 0 {
		fmt.Fprintln(g.errOut, "no host has heartbeated: start a worker (or the engine with --with-worker)")
		return nil
	}
	tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tSTATUS\tBACKENDS\tVMS\tVCPUS\tMEMORY\tVERSION\tLAST HEARTBEAT")
	for _, r := range rows {
		var bs []string
		for _, b := range r.Backends {
			s := string(b)
			if b == r.DefaultBackend {
				s += "*"
			}
			bs = append(bs, s)
		}
		vms := strconv.Itoa(r.VMs)
		if r.Leaving > 0 {
			vms += fmt.Sprintf(" (%d leaving)", r.Leaving)
		}
		if r.Arriving > 0 {
			vms += fmt.Sprintf(" (%d arriving)", r.Arriving)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%d/%dM\t%s\t%s ago\n", r.Host.Host, r.Status, strings.Join(bs, ","), vms,
			r.Placed.Vcpus, r.Capacity.Vcpus, r.Placed.MemoryMB, r.Capacity.MemoryMB, r.Version,
			time.Since(r.Time).Round(time.Second))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(g.out, "(* the host's default backend; VCPUS and MEMORY: placed/capacity, Noop VMs take none)")
	return nil
}

func (g *globals) hostCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "host",
		Short: "look after hosts: ls, cordon, uncordon, drain, forget",
	}
	ls := &cobra.Command{Use: "ls", Short: "the same as `vmctl hosts`", Args: noArgs, RunE: g.listHosts}

	var reason string
	cordon := &cobra.Command{
		Use:   "cordon HOST",
		Short: "place no new VM on a host (its VMs keep running)",
		Args:  hostArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.setCordon(cmd.Context(), args[0], true, reason)
		},
	}
	cordon.Flags().StringVar(&reason, "reason", "", "why, shown by `vmctl hosts` and in the host_cordoned event")
	uncordon := &cobra.Command{
		Use:   "uncordon HOST",
		Short: "let placement use a cordoned host again",
		Args:  hostArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.setCordon(cmd.Context(), args[0], false, "")
		},
	}
	drain := &cobra.Command{
		Use:   "drain HOST",
		Short: "cordon a host and move its VMs to others (live if they run or are suspended, cold if not); report what cannot move",
		Long: `Cordon HOST, then migrate each of its VMs to another host (placed as a
prepare would be): running and suspended VMs live, prepared and stopped
ones cold, --parallel at a time. A VM that cannot move (no host fits, a
command in flight, a failed VM) stays, and is listed with the reason;
the exit code is then 1. With --stop, drain stops the running and
suspended VMs instead and leaves them all there.`,
		Args: hostArg,
	}
	stopTimeout := stopTimeoutFlag(drain, "with --stop: how long each guest has to power off before it is killed")
	var stopOnly bool
	var parallel int
	drain.Flags().BoolVar(&stopOnly, "stop", false, "stop the host's VMs instead of moving them (they stay there, stopped)")
	drain.Flags().IntVar(&parallel, "parallel", 2, "how many VMs move at once")
	drain.RunE = func(cmd *cobra.Command, args []string) error {
		t, err := stopTimeout()
		if err != nil {
			return err
		}
		if parallel < 1 {
			return usageError("--parallel %d: at least 1", parallel)
		}
		if stopOnly {
			return g.drain(cmd.Context(), args[0], t)
		}
		if t != 0 {
			return usageError("--stop-timeout goes with --stop")
		}
		return g.drainMove(cmd.Context(), args[0], parallel)
	}
	forget := &cobra.Command{
		Use:   "forget HOST",
		Short: "remove a lost host that will not come back from the hosts (its VMs must be destroyed or forgotten first)",
		Args:  hostArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.forgetHost(cmd.Context(), args[0])
		},
	}
	for _, sub := range []*cobra.Command{cordon, uncordon, drain, forget} {
		sub.ValidArgsFunction = g.completeHosts
	}
	c.AddCommand(ls, cordon, uncordon, drain, forget)
	return c
}

// completeHosts completes host names from VM_HOSTS.
func (g *globals) completeHosts(cmd *cobra.Command, args []string, prefix string) ([]cobra.Completion, cobra.ShellCompDirective) {
	const none = cobra.ShellCompDirectiveNoFileComp
	if len(args) > 0 {
		return nil, none
	}
	if err := g.conn(); err != nil {
		return nil, none | cobra.ShellCompDirectiveError
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Second)
	defer cancel()
	hs, err := g.c.Hosts(ctx)
	if err != nil {
		return nil, none | cobra.ShellCompDirectiveError
	}
	var out []cobra.Completion
	for _, h := range hs {
		if strings.HasPrefix(h.Host, prefix) {
			out = append(out, h.Host)
		}
	}
	return out, none
}

func hostArg(cmd *cobra.Command, args []string) error {
	if len(args) != 1 {
		return usageError("%s takes one HOST (see `vmctl hosts`)", cmd.CommandPath())
	}
	if err := api.ValidateHost(args[0]); err != nil {
		return usageError("HOST %q: %s", args[0], ruleOf(err))
	}
	return nil
}

// knownHost returns the host's entry, or an error naming the known hosts.
func (g *globals) knownHost(ctx context.Context, name string) (*api.Host, map[string]*api.VmRecord, error) {
	hs, recs, err := g.fleet(ctx)
	if err != nil {
		return nil, nil, err
	}
	var names []string
	for _, h := range hs {
		if h.Host == name {
			return h, recs, nil
		}
		names = append(names, h.Host)
	}
	if len(names) == 0 {
		names = []string{"none"}
	}
	return nil, nil, &exitError{code: ExitFailed, msg: fmt.Sprintf("no host named %s (known hosts: %s)", name, strings.Join(names, ", "))}
}

func (g *globals) setCordon(ctx context.Context, name string, on bool, reason string) error {
	if err := g.conn(); err != nil {
		return err
	}
	if !on {
		changed, err := g.c.Uncordon(ctx, name)
		switch {
		case err != nil:
			return g.hostErr(err)
		case !changed:
			fmt.Fprintf(g.out, "host %s is not cordoned\n", name)
		default:
			fmt.Fprintf(g.out, "host %s uncordoned: new VMs may be placed on it\n", name)
		}
		return nil
	}
	changed, err := g.c.Cordon(ctx, name, reason)
	switch {
	case err != nil:
		return g.hostErr(err)
	case !changed:
		fmt.Fprintf(g.out, "host %s is already cordoned\n", name)
	default:
		fmt.Fprintf(g.out, "host %s cordoned: no new VM is placed on it; its VMs keep running\n", name)
	}
	return nil
}

// hostErr words the client's host errors.
func (g *globals) hostErr(err error) error {
	var uh *client.UnknownHostError
	var iu *client.HostInUseError
	switch {
	case errors.As(err, &uh):
		return &exitError{code: ExitFailed, kind: "not_found", msg: err.Error(), err: err}
	case errors.As(err, &iu) && !iu.Alive:
		return &exitError{code: ExitFailed, kind: "in_use", msg: strings.Replace(err.Error(), "(destroy with forget)", "(vmctl destroy --forget NAME)", 1), err: err}
	case errors.As(err, &iu):
		return &exitError{code: ExitFailed, kind: "in_use", msg: err.Error(), err: err}
	}
	return g.commandErr(err)
}

// startDrain cordons the host and returns its VMs; a lost host's VMs
// cannot be stopped or moved (done says which), and it says what to do
// instead.
func (g *globals) startDrain(ctx context.Context, name, done string) ([]*api.VmRecord, error) {
	if err := g.setCordon(ctx, name, true, "drain"); err != nil {
		return nil, err
	}
	h, recs, err := g.knownHost(ctx, name)
	if err != nil {
		return nil, err
	}
	vms := onHost(recs, name)
	if !h.Alive && len(vms) > 0 {
		return nil, &exitError{code: ExitFailed, msg: fmt.Sprintf("host %s is lost: its VMs cannot be %s; if it will not come back, forget them (vmctl destroy --forget NAME) and then the host (vmctl host forget %s)", name, done, name)}
	}
	return vms, nil
}

// drain (--stop) cordons the host, stops its running and suspended VMs
// (in parallel), and reports the VMs left on it: they stay there,
// stopped, until destroyed (or started again after uncordon).
func (g *globals) drain(ctx context.Context, name string, stopTimeout int) error {
	vms, err := g.startDrain(ctx, name, "stopped")
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed []string
	for _, r := range vms {
		if !running(r) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := g.send(ctx, r.Name, fsm.ActStop, api.Command{TimeoutS: stopTimeout})
			if err != nil {
				mu.Lock()
				failed = append(failed, fmt.Sprintf("%s: %v", r.Name, err))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(vms) > 0 {
		var left []string
		for _, r := range vms {
			left = append(left, r.Name)
		}
		fmt.Fprintf(g.out, "left on %s (stopped or prepared, with their disks): %s; destroy them, or uncordon the host to use them again\n", name, strings.Join(left, ", "))
	} else {
		fmt.Fprintf(g.out, "host %s is drained: no VM is on it\n", name)
	}
	if len(failed) > 0 {
		sort.Strings(failed)
		return &exitError{code: ExitFailed, msg: "not stopped: " + strings.Join(failed, "; ")}
	}
	return nil
}

// drainMove cordons the host and migrates its VMs away, parallel at a
// time, reporting progress and what could not move.
func (g *globals) drainMove(ctx context.Context, name string, parallel int) error {
	vms, err := g.startDrain(ctx, name, "moved")
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var stuck []string
	moved := 0
	sem := make(chan struct{}, parallel)
	for _, r := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			ev, err := g.send(ctx, r.Name, fsm.ActMigrate, api.Command{})
			mu.Lock()
			defer mu.Unlock()
			if err == nil && ev != nil && ev.Type == api.TypeMigrated {
				moved++
				fmt.Fprintf(g.errOut, "drain %s: %d of %d moved (%s to %s)\n", name, moved, len(vms), r.Name, ev.Migration.To)
				return
			}
			why := "no result"
			switch {
			case ev != nil && ev.Reason != "":
				why = ev.Reason
			case ev != nil && ev.Error != "":
				why = ev.Error
			case err != nil:
				why = err.Error()
			}
			stuck = append(stuck, fmt.Sprintf("%s (%s): %s", r.Name, r.State, why))
		}()
	}
	wg.Wait()
	if len(stuck) == 0 {
		fmt.Fprintf(g.out, "host %s is drained: its %d VMs moved to other hosts\n", name, moved)
		return nil
	}
	sort.Strings(stuck)
	fmt.Fprintf(g.out, "host %s: %d of %d VMs moved; left on it:\n  %s\n", name, moved, len(vms), strings.Join(stuck, "\n  "))
	return &exitError{code: ExitFailed, msg: fmt.Sprintf("%d VMs could not move off %s", len(stuck), name)}
}

// forgetHost removes a lost host's entries from VM_HOSTS.
func (g *globals) forgetHost(ctx context.Context, name string) error {
	if err := g.conn(); err != nil {
		return err
	}
	if err := g.c.ForgetHost(ctx, name); err != nil {
		return g.hostErr(err)
	}
	fmt.Fprintf(g.out, "host %s forgotten\n", name)
	return nil
}

// hostLost tells whether one host is lost now (for status).
func (g *globals) hostLost(ctx context.Context, host string) bool { return g.c.HostLost(ctx, host) }

// lostHosts returns the set of hosts that are lost now (for list).
func (g *globals) lostHosts(ctx context.Context) map[string]bool {
	hs, err := g.c.Hosts(ctx)
	if err != nil {
		return nil
	}
	lost := map[string]bool{}
	for _, h := range hs {
		if !h.Alive {
			lost[h.Host] = true
		}
	}
	return lost
}

package vmctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/hosts"
)

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
var listColumns = []string{"name", "state", "host", "backend", "vcpus", "memory", "ip", "in-flight", "updated", "labels"}

func (g *globals) listCmd() *cobra.Command {
	var (
		all            bool
		states, hostsF []string
		format         string
		columns        []string
		labels         []string
	)
	c := &cobra.Command{
		Use:   "list",
		Short: "list VMs from the VM_RECORDS projection, with their guest address",
		Long: `list prints the VMs' records (destroyed ones only with --all), filtered by
--state and --host (each repeatable or comma-separated; a VM must match one
value of every filter given) and --label (KEY=VALUE, or KEY for any value;
repeatable: a VM must have every label given).

--format table (default) prints the --columns chosen; json one document, an
array of records, each with host_lost (true when its host is lost) and ip
(when known); jsonl one record per line; yaml
the json document as YAML (the same field names); name only the names, one
per line (for xargs). --json is --format json.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if g.json && !cmd.Flags().Changed("format") {
				format = "json"
			}
			sel, err := parseSelector(labels)
			if err != nil {
				return err
			}
			switch format {
			case "table", "json", "jsonl", "yaml", "name":
			default:
				return usageError("--format %q: want table, json, jsonl, yaml or name", format)
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
				case !sel.matches(r):
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
			if format == "json" || format == "jsonl" || format == "yaml" {
				out := make([]listed, len(list))
				for i, r := range list {
					out[i] = listed{VmRecord: r, HostLost: lost[r.Host] && r.Live()}
					if ip := ips[i]; ip != "-" && ip != "?" {
						out[i].IP = ip
					}
				}
				switch format {
				case "json":
					return g.printJSON(out)
				case "yaml":
					return printYAML(g.out, out)
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
	f.StringArrayVar(&labels, "label", nil, "only VMs with this label: KEY=VALUE, or KEY for any value (repeatable: all must match)")
	f.StringVar(&format, "format", "table", "table, json, jsonl, yaml or name")
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
	case "labels":
		return formatLabels(r.Labels)
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
					// What the backend shows of its data (accel,
					// vnc, ssh...), which only it reads.
					for _, k := range slices.Sorted(maps.Keys(live.Details)) {
						fmt.Fprintf(tw, "%s:\t%s\n", printable(k), printable(live.Details[k]))
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

// printable is s, or s quoted when it holds characters that would act on
// the terminal instead of showing (a worker's details reach it as sent).
func printable(s string) string {
	if strings.ContainsFunc(s, func(r rune) bool { return !unicode.IsGraphic(r) && r != ' ' }) {
		return strconv.QuoteToGraphic(s)
	}
	return s
}

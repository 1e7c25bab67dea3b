package vmctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/vm"
	"github.com/vmherd/vmherd/internal/worker"
)

func (g *globals) createCmd() *cobra.Command {
	var (
		spec                      vm.VmSpec
		network, bridge           string
		cloudInit, sshKey, netCfg string
		host, backend             string
		start                     bool
		sshUser                   string
	)
	c := &cobra.Command{
		Use:   "create NAME",
		Short: "prepare a VM (disk overlay, cloud-init seed, network), optionally --start it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec.Name = args[0]
			spec.Backend = vm.BackendTag(backend)
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
						return &exitError{code: 2, msg: fmt.Sprintf("--cloud-init: %v", err)}
					}
					spec.CloudInit.UserData = string(b)
				}
				if netCfg != "" {
					b, err := os.ReadFile(netCfg)
					if err != nil {
						return &exitError{code: 2, msg: fmt.Sprintf("--network-config: %v", err)}
					}
					spec.CloudInit.NetworkConfig = string(b)
				}
			}
			if sshKey != "" {
				key := sshKey
				if b, err := os.ReadFile(sshKey); err == nil {
					key = strings.TrimSpace(string(b))
				}
				spec.SSH = &vm.SshConfig{User: sshUser, PublicKey: key}
			}
			ctx := cmd.Context()
			ev, err := g.send(ctx, spec.Name, "prepare", events.Command{Spec: &spec, Host: host})
			if err != nil || !start || g.noWait || ev == nil {
				return err
			}
			_, err = g.send(ctx, spec.Name, "start", events.Command{})
			return err
		},
	}
	f := c.Flags()
	f.StringVar(&spec.ImagePath, "image", "", "base disk image (qcow2 or raw) on the VM's host")
	f.IntVar(&spec.Vcpus, "vcpus", 1, "virtual CPUs")
	f.IntVar(&spec.MemoryMB, "memory", 512, "memory in MiB")
	f.IntVar(&spec.DiskGB, "disk", 0, "grow the disk overlay to this many GiB (0: base size)")
	f.StringVar(&network, "network", "user", "user, tap[:BRIDGE], vnic[:NAME] or none")
	f.StringVar(&bridge, "bridge", "", "bridge for tap networking")
	f.StringVar(&cloudInit, "cloud-init", "", "file with cloud-init user-data")
	f.StringVar(&netCfg, "network-config", "", "file with cloud-init network-config")
	f.StringVar(&sshKey, "ssh-key", "", "SSH public key (a file or the key itself) for the generated user-data")
	f.StringVar(&sshUser, "ssh-user", "vm", "user created with --ssh-key")
	f.BoolVar(&spec.UEFI, "uefi", false, "boot with UEFI (OVMF)")
	f.StringVar(&spec.Accel, "accel", "", "QEMU accelerator: auto, kvm or tcg")
	f.StringVar(&backend, "backend", "", "noop, qemu or propolis (default: the host's default)")
	f.StringVar(&host, "host", "", "pin the VM to this host (default: the alive host with the most free memory)")
	f.BoolVar(&start, "start", false, "start the VM once prepared")
	return c
}

func (g *globals) lifecycleCmd(action, short string) *cobra.Command {
	var timeoutS int
	c := &cobra.Command{
		Use:   action + " NAME",
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			_, err := g.send(cmd.Context(), args[0], action, events.Command{TimeoutS: timeoutS})
			return err
		},
	}
	if action == "destroy" {
		c.Flags().IntVar(&timeoutS, "stop-timeout", 0, "seconds to wait for a clean stop before killing (default: the worker's)")
	}
	return c
}

func (g *globals) stopCmd() *cobra.Command {
	var timeout time.Duration
	c := &cobra.Command{
		Use:   "stop NAME",
		Short: "stop a VM: ACPI power-off, then forced after --stop-timeout",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cmdBody := events.Command{}
			if timeout > 0 {
				cmdBody.TimeoutS = max(1, int(timeout.Seconds()))
			}
			_, err := g.send(cmd.Context(), args[0], "stop", cmdBody)
			return err
		},
	}
	c.Flags().DurationVar(&timeout, "stop-timeout", 0, "how long the guest has to power off before it is killed (default 30s)")
	return c
}

func (g *globals) record(ctx context.Context, name string) (*projection.VmRecord, error) {
	kv, err := g.js.KeyValue(ctx, g.names.RecordsBucket())
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w (has the engine ever run on this server?)", g.names.RecordsBucket(), err)
	}
	e, err := kv.Get(ctx, name)
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil, &exitError{code: 1, msg: fmt.Sprintf("no vm named %s (vmctl list shows the VMs)", name)}
		}
		return nil, err
	}
	return projection.Unmarshal(e.Value())
}

func (g *globals) listCmd() *cobra.Command {
	var all bool
	c := &cobra.Command{
		Use:   "list",
		Short: "list VMs from the VM_RECORDS projection",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			recs, err := projection.Load(cmd.Context(), g.js, g.names)
			if err != nil {
				return err
			}
			var list []*projection.VmRecord
			for _, r := range recs {
				if all || r.State != vm.StateDestroyed {
					list = append(list, r)
				}
			}
			sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
			if g.json {
				return g.printJSON(list)
			}
			tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSTATE\tHOST\tBACKEND\tIN FLIGHT\tUPDATED")
			for _, r := range list {
				var inflight []string
				for _, f := range r.InFlight {
					inflight = append(inflight, f.Action)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Name, r.State, r.Host, r.Backend,
					strings.Join(inflight, ","), r.UpdatedAt.Local().Format(time.DateTime))
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&all, "all", false, "include destroyed VMs")
	return c
}

// query asks the worker on the VM's host.
func (g *globals) query(ctx context.Context, r *projection.VmRecord, endpoint string, out any) error {
	req, _ := json.Marshal(worker.QueryRequest{VM: r.Name})
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	m, err := g.nc.RequestWithContext(qctx, g.names.Query(r.Host)+"."+endpoint, req)
	if err != nil {
		return fmt.Errorf("asking the worker on host %s: %w (is it running?)", r.Host, err)
	}
	if code := m.Header.Get("Nats-Service-Error-Code"); code != "" {
		return fmt.Errorf("worker on host %s: %s", r.Host, m.Header.Get("Nats-Service-Error"))
	}
	return json.Unmarshal(m.Data, out)
}

func (g *globals) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status NAME",
		Short: "show a VM's record and its live state from the worker",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := g.record(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			var live worker.StateReply
			liveErr := error(nil)
			if r.State != vm.StateDestroyed {
				liveErr = g.query(cmd.Context(), r, "state", &live)
			}
			if g.json {
				out := map[string]any{"record": r}
				if liveErr == nil && live.State != "" {
					out["live"] = live
				} else if liveErr != nil {
					out["live_error"] = liveErr.Error()
				}
				return g.printJSON(out)
			}
			tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "name:\t%s\n", r.Name)
			fmt.Fprintf(tw, "state:\t%s\n", r.State)
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
					fmt.Fprintf(tw, "ssh:\t127.0.0.1:%d\n", h.SSHPort)
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
		Use:   "ip NAME",
		Short: "print the guest's address (user networking: 127.0.0.1 and the forwarded SSH port)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := g.record(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			var ip worker.GuestIPReply
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
		Use:   "events [NAME]",
		Short: "print events (of one VM, or all), and with --follow keep printing new ones",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			subj := g.names.Events()
			if len(args) == 1 {
				if err := vm.ValidateName(args[0]); err != nil {
					return &exitError{code: 2, msg: err.Error()}
				}
				subj = g.names.VMEvents(args[0])
			}
			return g.streamEvents(cmd.Context(), subj, follow, last, false)
		},
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new events")
	c.Flags().IntVar(&last, "last", 0, "start with the last N events (0: all)")
	return c
}

func (g *globals) historyCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "history NAME",
		Short: "print every event of one VM, oldest first",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := vm.ValidateName(args[0]); err != nil {
				return &exitError{code: 2, msg: err.Error()}
			}
			return g.streamEvents(cmd.Context(), g.names.VMEvents(args[0]), false, 0, true)
		},
	}
}

func (g *globals) streamEvents(ctx context.Context, subj string, follow bool, last int, withSeq bool) error {
	st, err := g.js.Stream(ctx, g.names.EventsStream())
	if err != nil {
		return fmt.Errorf("opening %s: %w", g.names.EventsStream(), err)
	}
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{subj}}
	var pending uint64
	if subj == g.names.Events() {
		info, err := st.Info(ctx)
		if err != nil {
			return err
		}
		pending = info.State.Msgs
	} else {
		info, err := st.Info(ctx, jetstream.WithSubjectFilter(subj))
		if err != nil {
			return err
		}
		for _, n := range info.State.Subjects {
			pending += n
		}
	}
	skip := uint64(0)
	if last > 0 && pending > uint64(last) {
		skip = pending - uint64(last)
	}
	cons, err := st.OrderedConsumer(ctx, cfg)
	if err != nil {
		return err
	}
	if pending == 0 && !follow {
		if g.json {
			return g.printJSON([]any{})
		}
		return nil
	}
	it, err := cons.Messages()
	if err != nil {
		return err
	}
	defer it.Stop()
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	var seen uint64
	var list []*events.Event
	for {
		if !follow && seen >= pending {
			break
		}
		m, err := it.Next()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		seen++
		if seen <= skip {
			continue
		}
		md, _ := m.Metadata()
		ev, err := events.Decode(m.Data())
		if err != nil {
			continue
		}
		if g.json {
			if follow {
				b, _ := json.Marshal(ev)
				fmt.Fprintln(g.out, string(b))
			} else {
				list = append(list, ev)
			}
			continue
		}
		var seq uint64
		if withSeq && md != nil {
			seq = md.Sequence.Stream
		}
		fmt.Fprintln(g.out, formatEvent(seq, ev))
	}
	if g.json && !follow {
		return g.printJSON(list)
	}
	return nil
}

package vmctl

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"
	"github.com/vmherd/vmherd/internal/provision"

	"github.com/spf13/cobra"
)

func (g *globals) createCmd() *cobra.Command {
	var (
		spec                      api.VmSpec
		network, bridge           string
		cloudInit, sshKey, netCfg string
		host, backend             string
		start, ifNotExists        bool
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
			var err error
			if spec.Labels, err = parseLabels(labels); err != nil {
				return err
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
	f.StringArrayVar(&labels, "label", nil, "a label KEY=VALUE to set on the VM (repeatable; metadata only, `vmctl list --label` filters by it; the guest never sees it)")
	f.BoolVar(&ifNotExists, "if-not-exists", false, "succeed without doing anything when a VM of that name exists (in any state but destroyed)")
	return c
}

// explainExists words a rejected prepare of a name in use as what it is.
func (g *globals) explainExists(ctx context.Context, name string, err error) error {
	var rej *client.RejectedError
	if !errors.As(err, &rej) {
		return err
	}
	if strings.HasPrefix(rej.Reason, "spec.") || strings.HasPrefix(rej.Reason, "spec:") {
		// A spec that breaks a rule is a usage error (exit 2), whether
		// vmctl finds it or the engine does with the host's defaults
		// filled in (its default backend needs an image).
		return &exitError{code: ExitUsage, kind: "usage", err: err, msg: fmt.Sprintf("the engine rejected prepare of %s: %s", name, flagWords(rej.Reason))}
	}
	if r, rerr := g.c.Record(ctx, name); rerr == nil && r.Live() {
		return &exitError{code: ExitFailed, kind: "exists", err: err, msg: fmt.Sprintf("a VM named %s already exists (state %s): the engine rejected prepare: %s\nhelp: --if-not-exists makes that a success; `vmctl destroy %s` frees the name", name, r.State, flagWords(rej.Reason), name)}
	}
	return err
}

// readPublicKey reads --ssh-key (a usage error when it is no public key
// file).
func readPublicKey(path string) (string, error) {
	key, err := provision.ReadPublicKey(path)
	if err != nil {
		return "", usageError("--ssh-key %v", err)
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
	c.Flags().BoolVar(&b, "if-needed", false, fmt.Sprintf("succeed without doing anything when the VM already is %s", action.Outcome()))
	return &b
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
		case err == nil && r.State == action.Outcome() && len(r.InFlight) == 0:
			flag := "--if-needed"
			if action == api.ActDestroy {
				flag = "--if-exists"
			}
			l.skip(action, fmt.Sprintf("already %s; %s", r.State, flag))
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

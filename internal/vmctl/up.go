package vmctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"github.com/spf13/cobra"
)

// vmfileFlags are the flags up, down, reload and provision share.
type vmfileFlags struct {
	file   string
	name   string
	reads  bool // the command reads the files the VMFile names
	allow  []string
	secret []string
}

func (f *vmfileFlags) add(c *cobra.Command) {
	c.Flags().StringVarP(&f.file, "file", "f", "VMFile.kdl", "the VMFile")
	c.Flags().StringVar(&f.name, "name", "", "only this VM of the file")
	if f.reads {
		c.Flags().StringArrayVar(&f.allow, "allow-path", nil, "a directory whose files the VMFile may name besides its own directory (repeatable)")
		c.Flags().StringArrayVar(&f.secret, "allow-secret", nil, "a file that may go into a spec or guest although it looks like a private key or NATS credentials (repeatable)")
	}
}

// options are the client's VMFile options: the file's VMs as flags pick
// them, what happens printed as the lifecycle commands print it.
func (g *globals) vmfileOptions(f *vmfileFlags, noProvision bool) client.VMFileOptions {
	o := client.VMFileOptions{Name: f.name, AllowPaths: f.allow, AllowSecrets: f.secret, NoProvision: noProvision, Out: g.out}
	if g.json {
		o.Out = io.Discard
	}
	accepted := map[string]bool{}
	o.Wait = []client.WaitOption{client.WithProgress(func(p client.Progress) {
		if p.Waiting == "result" && !accepted[p.CommandID] {
			accepted[p.CommandID] = true
			g.printf("%s %s: accepted on host %s (%s)\n", p.Action, p.VM, p.Host, p.Action.Pending())
		}
	})}
	o.Sent = func(res *client.Result, err error) {
		var rej *client.RejectedError
		var failed *client.FailedError
		switch {
		case res != nil && res.Final != nil:
			g.printEvent(res.Final)
		case errors.As(err, &rej):
			g.printEvent(rej.Event)
		case errors.As(err, &failed):
			g.printEvent(failed.Event)
		}
	}
	return o
}

// vmfileErr words the client's VMFile errors.
func (g *globals) vmfileErr(f *vmfileFlags, err error) error {
	var ve *client.VMFileError
	var de *client.DriftError
	var nr *client.NotRunningError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ve):
		return &exitError{code: ExitUsage, kind: "usage", msg: ve.Error(), err: err}
	case errors.As(err, &de):
		return &exitError{code: ExitFailed, kind: "changed", msg: fmt.Sprintf("%s changed in the VMFile; apply with: vmctl reload --name %s", strings.Join(de.VMs, ", "), de.VMs[0]), err: err}
	case errors.As(err, &nr):
		return &exitError{code: ExitFailed, kind: "not_running", msg: fmt.Sprintf("%s; vmctl up first", strings.TrimSuffix(nr.Error(), "; up first")), err: err}
	}
	var ee *exitError
	if errors.As(g.commandErr(err), &ee) {
		return ee
	}
	return &exitError{code: ExitFailed, msg: err.Error(), err: err}
}

func (g *globals) upCmd() *cobra.Command {
	f := vmfileFlags{reads: true}
	var noProvision bool
	c := &cobra.Command{
		Use:   "up",
		Short: "create and start the VMs of a VMFile.kdl as defined, and provision new ones",
		Long: `up makes each VM of the VMFile exist and run as defined: a VM that does not
exist (or was destroyed) is created, started, and provisioned over SSH; one
that exists with the same definition is started if it is not running; one
whose definition changed is left alone and the differences are printed:
apply them with vmctl reload NAME (destroy and create again), since a VM's
spec is fixed when it is prepared. image-url images are pulled first (onto
the VM's host if it is pinned, else onto every alive host).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.conn(); err != nil {
				return err
			}
			return g.vmfileErr(&f, g.c.Up(cmd.Context(), f.file, g.vmfileOptions(&f, noProvision)))
		},
	}
	f.add(c)
	c.Flags().BoolVar(&noProvision, "no-provision", false, "do not provision VMs up creates")
	return c
}

func (g *globals) downCmd() *cobra.Command {
	var f vmfileFlags
	var destroy bool
	c := &cobra.Command{
		Use:   "down",
		Short: "stop the VMs of a VMFile.kdl (--destroy: destroy them)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.conn(); err != nil {
				return err
			}
			return g.vmfileErr(&f, g.c.Down(cmd.Context(), f.file, destroy, g.vmfileOptions(&f, false)))
		},
	}
	f.add(c)
	c.Flags().BoolVar(&destroy, "destroy", false, "destroy the VMs (the engines then delete their generated keys)")
	return c
}

func (g *globals) reloadCmd() *cobra.Command {
	f := vmfileFlags{reads: true}
	var noProvision bool
	c := &cobra.Command{
		Use:   "reload",
		Short: "destroy the VMs of a VMFile.kdl and create them again as defined (and provision them)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.conn(); err != nil {
				return err
			}
			return g.vmfileErr(&f, g.c.Reload(cmd.Context(), f.file, g.vmfileOptions(&f, noProvision)))
		},
	}
	f.add(c)
	c.Flags().BoolVar(&noProvision, "no-provision", false, "do not provision")
	return c
}

func (g *globals) provisionCmd() *cobra.Command {
	f := vmfileFlags{reads: true}
	c := &cobra.Command{
		Use:   "provision",
		Short: "run the provision steps of a VMFile.kdl on its running VMs, over SSH through NATS",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.conn(); err != nil {
				return err
			}
			return g.vmfileErr(&f, g.c.Provision(cmd.Context(), f.file, g.vmfileOptions(&f, false)))
		},
	}
	f.add(c)
	return c
}

// existing is the VM's record, nil when it does not exist (or was
// destroyed).
func (g *globals) existing(ctx context.Context, name string) (*api.VmRecord, error) {
	r, err := g.record(ctx, name)
	var ee *exitError
	if errors.As(err, &ee) && ee.kind == "not_found" {
		return nil, nil
	}
	if err != nil || !r.Live() {
		return nil, err
	}
	return r, nil
}

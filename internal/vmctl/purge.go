package vmctl

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/api"
)

// purgeDoc is what `purge --json` prints: one document for the
// invocation, a lifecycle document per VM (with its error, if any).
type purgeDoc struct {
	VMs []commandsDoc `json:"vms"`
}

// purgeCmd is `vmctl purge NAME...` and `vmctl purge --all-destroyed
// [--older-than D]`: a purge command for each VM, one after the other.
// Every VM is tried; the exit code is the worst of them.
func (g *globals) purgeCmd() *cobra.Command {
	var (
		allDestroyed bool
		olderThan    time.Duration
	)
	c := &cobra.Command{
		Use:   "purge NAME... | purge --all-destroyed [--older-than D]",
		Short: "remove destroyed VMs' records and events (the names become new)",
		Long: `purge removes destroyed VMs from VM_RECORDS (list --all, completion) and
their events from VM_EVENTS; a VM created later with the same name starts
afresh. Only a destroyed VM with no command in flight is purged; anything
else is rejected with the reason (exit 1, after trying the others). The
engines also purge destroyed VMs by themselves after --retain-destroyed
(7 days by default).`,
		ValidArgsFunction: g.completeDestroyed, // any number of names
		RunE: func(cmd *cobra.Command, args []string) error {
			switch {
			case allDestroyed && len(args) > 0:
				return usageError("give NAMEs or --all-destroyed, not both")
			case !allDestroyed && len(args) == 0:
				return usageError("purge needs a NAME, or --all-destroyed\nUsage: %s", cmd.UseLine())
			case olderThan != 0 && !allDestroyed:
				return usageError("--older-than goes with --all-destroyed")
			case olderThan < 0:
				return usageError("--older-than %s: want a duration >= 0", olderThan)
			}
			for _, name := range args {
				if err := api.ValidateName(name); err != nil {
					return usageError("NAME %q: %s", name, ruleOf(err))
				}
			}
			ctx := cmd.Context()
			names := args
			if allDestroyed {
				var err error
				if names, err = g.destroyedBefore(ctx, time.Now().Add(-olderThan)); err != nil {
					return err
				}
				if len(names) == 0 {
					g.printf("no destroyed VMs to purge\n")
				}
			}
			doc := purgeDoc{VMs: []commandsDoc{}}
			var worst error
			for _, name := range names {
				l := g.newLifecycle(name)
				_, err := l.send(ctx, api.ActPurge, api.Command{})
				var ee *exitError
				switch {
				case err == nil:
					g.printf("purge %s: purged: its record and events are gone, the name is free\n", name)
				case errors.As(err, &ee) && ee.code == ExitFailed:
					// Rejected: say why and go on with the others.
					l.doc.Error = errorDoc(ee)
					if !g.json {
						fmt.Fprintln(g.errOut, "vmctl:", ee.msg)
					}
					worst = &exitError{code: ExitFailed, kind: ee.kind}
				default:
					return err // an outage or an interrupt: the rest would fare no better
				}
				doc.VMs = append(doc.VMs, l.doc)
			}
			if g.json {
				if err := g.printJSON(doc); err != nil {
					return err
				}
			}
			return worst
		},
	}
	c.Flags().BoolVar(&allDestroyed, "all-destroyed", false, "purge every destroyed VM")
	c.Flags().DurationVar(&olderThan, "older-than", 0, "with --all-destroyed: only those destroyed longer ago than this (e.g. 24h)")
	return c
}

// destroyedBefore lists the destroyed VMs whose last event is before t.
func (g *globals) destroyedBefore(ctx context.Context, t time.Time) ([]string, error) {
	if err := g.conn(); err != nil {
		return nil, err
	}
	recs, err := g.c.Records(ctx)
	if err != nil {
		return nil, g.commandErr(err)
	}
	var out []string
	for _, r := range recs {
		if r.Destroyed() && len(r.InFlight) == 0 && r.UpdatedAt.Before(t) {
			out = append(out, r.Name)
		}
	}
	sort.Strings(out)
	return out, nil
}

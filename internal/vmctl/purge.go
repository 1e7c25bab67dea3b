package vmctl

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/vm"
)

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
else is rejected with the reason (exit 1). An operator may purge only the
VMs it created; an admin any. The engines also purge destroyed VMs by
themselves after --retain-destroyed (7 days by default).`,
		ValidArgsFunction: g.completeNames,
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
				if err := vm.ValidateName(name); err != nil {
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
				if len(names) == 0 && !g.json {
					g.printf("no destroyed VMs to purge\n")
				}
			}
			var worst error
			for _, name := range names {
				if _, err := g.send(ctx, name, fsm.ActPurge, events.Command{}); err != nil {
					var ee *exitError
					if !errors.As(err, &ee) || ee.code != ExitFailed {
						return err // an outage or an interrupt ends it: the rest would fare no better
					}
					fmt.Fprintln(g.errOut, "vmctl:", ee.msg)
					worst = &exitError{code: ExitFailed}
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
	recs, err := projection.Load(ctx, g.js, g.names)
	if err != nil {
		return nil, err
	}
	var out []string
	for name, r := range recs {
		if r.State == vm.StateDestroyed && len(r.InFlight) == 0 && r.UpdatedAt.Before(t) {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out, nil
}

// awaitGone waits, briefly, until the VM's record has left VM_RECORDS
// (a purge's fold), so that list and completion no longer show it when
// vmctl returns.
func (g *globals) awaitGone(ctx context.Context, name string) {
	ctx, cancel := context.WithTimeout(ctx, recordLag)
	defer cancel()
	for {
		kv, err := g.recordsKV(ctx)
		if err == nil {
			if _, err = kv.Get(ctx, name); errors.Is(err, jetstream.ErrKeyNotFound) {
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}

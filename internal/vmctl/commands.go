package vmctl

import (
	"context"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/api"
)

// completeNames completes VM names from the records bucket.
func (g *globals) completeNames(cmd *cobra.Command, args []string, prefix string) ([]cobra.Completion, cobra.ShellCompDirective) {
	// Destroyed VMs are no names to act on (their records stay until
	// purged).
	return g.completeRecords(cmd, args, prefix, (*api.VmRecord).Live)
}

// completeDestroyed completes the names of destroyed VMs (purge's).
func (g *globals) completeDestroyed(cmd *cobra.Command, args []string, prefix string) ([]cobra.Completion, cobra.ShellCompDirective) {
	return g.completeRecords(cmd, nil, prefix, (*api.VmRecord).Destroyed)
}

// completeRecords completes the names of the records that keep accepts.
func (g *globals) completeRecords(cmd *cobra.Command, args []string, prefix string, keep func(*api.VmRecord) bool) ([]cobra.Completion, cobra.ShellCompDirective) {
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
		if keep(r) && strings.HasPrefix(r.Name, prefix) {
			names = append(names, r.Name)
		}
	}
	return names, cobra.ShellCompDirectiveNoFileComp
}

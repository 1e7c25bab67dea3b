package vmctl

import (
	"context"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

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

package vmctl

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"github.com/spf13/cobra"
)

func (g *globals) imageCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "image",
		Short: "pull, list, inspect and remove the images in the workers' image stores",
	}
	c.AddCommand(g.imagePullCmd(), g.imageListCmd(), g.imageInspectCmd(), g.imageRmCmd())
	return c
}

// imageHosts picks the hosts an image command goes to: --host, every
// alive host (--all-hosts), or the only alive host.
func (g *globals) imageHosts(ctx context.Context, host string, all bool) ([]string, error) {
	if host != "" && all {
		return nil, usageError("give --host or --all-hosts, not both")
	}
	if err := g.conn(); err != nil {
		return nil, err
	}
	hs, err := g.c.Hosts(ctx)
	if err != nil {
		return nil, g.commandErr(err)
	}
	var alive []string
	for _, h := range hs {
		if h.Alive {
			alive = append(alive, h.Host)
		}
	}
	slices.Sort(alive)
	switch {
	case host != "":
		if !slices.Contains(alive, host) {
			return nil, &exitError{code: ExitFailed, msg: fmt.Sprintf("host %s is not alive (alive: %s)", host, strings.Join(alive, ", "))}
		}
		return []string{host}, nil
	case all || len(alive) == 1:
		if len(alive) == 0 {
			return nil, &exitError{code: ExitFailed, msg: "no host is alive"}
		}
		return alive, nil
	}
	return nil, usageError("%d hosts are alive (%s): give --host HOST or --all-hosts", len(alive), strings.Join(alive, ", "))
}

func (g *globals) imagePullCmd() *cobra.Command {
	var name, sha, host string
	var all bool
	c := &cobra.Command{
		Use:   "pull SOURCE",
		Short: "pull an image (http(s)://… or oci://registry/repo:tag|@digest) into a worker's image store",
		Long: `pull asks the worker of each host to fetch SOURCE into its image store
(<data-dir>/images), then shows each pull's progress until it is ready or
failed. A pull is checked (HTTP status, length, --sha256 of the bytes as
served, OCI digest), decompressed when it is zstd, and stored only when
whole. The same content is stored once; pulling it again only names it.`,
		Example: `  vmctl image pull https://example.com/debian-12.qcow2.zst --sha256 3a7b…
  vmctl image pull oci://ghcr.io/org/vms/debian:12 --all-hosts`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			hs, err := g.imageHosts(ctx, host, all)
			if err != nil {
				return err
			}
			if name == "" {
				name = api.ImageNameFrom(args[0])
			}
			if err := api.ValidateName(name); err != nil {
				return usageError("image name %q: %s (give one with --name)", name, ruleOf(err))
			}
			return g.pull(ctx, hs, api.ImagePullRequest{Source: args[0], Name: name, SHA256: sha})
		},
	}
	c.Flags().StringVar(&name, "name", "", "name of the image (default: from SOURCE, e.g. debian-12 for …/debian-12.qcow2.zst)")
	c.Flags().StringVar(&sha, "sha256", "", "sha256 the bytes as served must have (hex)")
	c.Flags().StringVar(&host, "host", "", "the host whose store gets it (default: the only alive host)")
	c.Flags().BoolVar(&all, "all-hosts", false, "every alive host")
	return c
}

// kvPollEvery is how often a pull's status is read (events.KVPoll: a
// KV watch is a consumer, which vmctl's credentials may not delete).
const kvPollEvery = 250 * time.Millisecond

// pull asks each host's worker to pull, then shows the pulls' progress
// until each is ready or failed.
func (g *globals) pull(ctx context.Context, hosts []string, req api.ImagePullRequest) error {
	started := time.Now()
	// Watch before asking, so no status is missed.
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	updates, err := g.c.ImageUpdates(wctx, req.Name, kvPollEvery)
	if err != nil {
		return g.commandErr(err)
	}
	for _, h := range hosts {
		if err := g.c.PullImage(ctx, h, req); err != nil {
			return g.commandErr(err)
		}
	}
	pending := map[string]bool{}
	for _, h := range hosts {
		pending[h] = true
	}
	failures := map[string]string{}
	for len(pending) > 0 {
		st, ok := <-updates
		if !ok {
			return fmt.Errorf("stopped waiting; the pulls go on (vmctl image list shows them): %w", ctx.Err())
		}
		if !pending[st.Host] || st.Time.Before(started.Add(-time.Second)) {
			continue
		}
		switch st.State {
		case api.ImagePulling:
			if st.TotalBytes > 0 {
				fmt.Fprintf(g.errOut, "%s %s: %s / %s (%.0f%%)\n", st.Host, st.Name, mib(st.DoneBytes), mib(st.TotalBytes), 100*float64(st.DoneBytes)/float64(st.TotalBytes))
			} else {
				fmt.Fprintf(g.errOut, "%s %s: %s\n", st.Host, st.Name, mib(st.DoneBytes))
			}
		case api.ImageReady:
			delete(pending, st.Host)
			g.printf("%s %s: ready, %s, %s\n", st.Host, st.Name, mib(st.Size), st.Digest)
		case api.ImageFailed:
			delete(pending, st.Host)
			failures[st.Host] = st.Error
			fmt.Fprintf(g.errOut, "%s %s: failed: %s\n", st.Host, st.Name, st.Error)
		}
	}
	if len(failures) > 0 {
		var on []string
		for h := range failures {
			on = append(on, h)
		}
		slices.Sort(on)
		return &exitError{code: ExitFailed, kind: "failed", msg: fmt.Sprintf("the pull failed on %s", strings.Join(on, ", ")), err: &client.PullFailedError{Name: req.Name, Failures: failures}}
	}
	return nil
}

func mib(n int64) string {
	if n < 1<<20 {
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}

// imageStatuses reads VM_IMAGES (one host's or all; one image or all).
func (g *globals) imageStatuses(ctx context.Context, host, name string) ([]api.ImageStatus, error) {
	if err := g.conn(); err != nil {
		return nil, err
	}
	sts, err := g.c.Images(ctx, host, name)
	return sts, g.commandErr(err)
}

func (g *globals) imageListCmd() *cobra.Command {
	var host string
	c := &cobra.Command{
		Use:   "list",
		Short: "list the images on every host (or one)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			sts, err := g.imageStatuses(cmd.Context(), host, "")
			if err != nil {
				return err
			}
			if g.json {
				return g.printJSON(sts)
			}
			tw := tabwriter.NewWriter(g.out, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tHOST\tSTATE\tSIZE\tDIGEST\tSOURCE")
			for _, st := range sts {
				size, digest := "-", "-"
				if st.State == api.ImageReady {
					size, digest = mib(st.Size), shortDigest(st.Digest)
				} else if st.State == api.ImagePulling {
					size = mib(st.DoneBytes) + " so far"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", st.Name, st.Host, st.State, size, digest, st.Source)
			}
			return tw.Flush()
		},
	}
	c.Flags().StringVar(&host, "host", "", "only this host's images")
	return c
}

func shortDigest(d string) string {
	if len(d) > len("sha256:")+12 {
		return d[:len("sha256:")+12]
	}
	return d
}

func (g *globals) imageInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect NAME",
		Short: "show an image's status on every host that has it (JSON)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sts, err := g.imageStatuses(cmd.Context(), "", args[0])
			if err != nil {
				return err
			}
			if len(sts) == 0 {
				return &exitError{code: ExitFailed, msg: fmt.Sprintf("no host has an image named %s (vmctl image list shows them)", args[0])}
			}
			return g.printJSON(sts)
		},
	}
}

func (g *globals) imageRmCmd() *cobra.Command {
	var host string
	var all bool
	c := &cobra.Command{
		Use:   "rm NAME",
		Short: "remove an image from a host's store (refused while a VM there uses it)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			sts, err := g.imageStatuses(ctx, "", args[0])
			if err != nil {
				return err
			}
			var on []string
			for _, st := range sts {
				if host == "" || st.Host == host {
					on = append(on, st.Host)
				}
			}
			if len(on) == 0 {
				return &exitError{code: ExitFailed, msg: fmt.Sprintf("no host has an image named %s", args[0])}
			}
			if len(on) > 1 && !all {
				return usageError("hosts %s have %s: give --host HOST or --all-hosts", strings.Join(on, ", "), args[0])
			}
			var errs []error
			for _, h := range on {
				if err := g.c.RemoveImage(ctx, h, args[0]); err != nil {
					errs = append(errs, g.commandErr(err))
					continue
				}
				g.printf("%s %s: removed\n", h, args[0])
			}
			return errors.Join(errs...)
		},
	}
	c.Flags().StringVar(&host, "host", "", "the host to remove it from")
	c.Flags().BoolVar(&all, "all-hosts", false, "every host that has it")
	return c
}

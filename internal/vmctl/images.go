package vmctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/images"
)

func (g *globals) imageCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "image",
		Short: "pull, list, inspect and remove the images in the workers' image stores",
	}
	c.AddCommand(g.imagePullCmd(), g.imageListCmd(), g.imageInspectCmd(), g.imageRmCmd())
	return c
}

// imagesKV opens VM_IMAGES.
func (g *globals) imagesKV(ctx context.Context) (jetstream.KeyValue, error) {
	if err := g.conn(); err != nil {
		return nil, err
	}
	kv, err := g.js.KeyValue(ctx, g.names.ImagesBucket())
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w (is the engine new enough to create it?)", g.names.ImagesBucket(), err)
	}
	return kv, nil
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
	kv, err := g.js.KeyValue(ctx, g.names.HostsBucket())
	if err != nil {
		return nil, err
	}
	hs, err := g.hostSnapshot(ctx, kv)
	if err != nil {
		return nil, err
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

// imageRequest asks host's worker and decodes its reply.
func (g *globals) imageRequest(ctx context.Context, host string, op api.ImageOp, body any) error {
	b, _ := json.Marshal(body)
	rctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	m, err := g.nc.RequestWithContext(rctx, g.names.Image(host, op), b)
	if err != nil {
		return fmt.Errorf("asking the worker on host %s: %w (is it running?)", host, err)
	}
	if code := m.Header.Get("Nats-Service-Error-Code"); code != "" {
		return &client.WorkerError{Host: host, Code: code, Message: m.Header.Get("Nats-Service-Error")}
	}
	return nil
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
			kv, err := g.imagesKV(ctx)
			if err != nil {
				return err
			}
			if name == "" {
				name = images.NameFrom(args[0])
			}
			if err := api.ValidateName(name); err != nil {
				return usageError("image name %q: %s (give one with --name)", name, ruleOf(err))
			}
			// Watch before asking, so no status is missed.
			keys := make([]string, len(hs))
			for i, h := range hs {
				keys[i] = api.ImageKey(h, name)
			}
			w, err := events.KVPoll(ctx, g.js, kv.Bucket(), "*."+name, kvPollEvery)
			if err != nil {
				return err
			}
			defer func() { _ = w.Stop() }()
			started := time.Now()
			for _, h := range hs {
				if err := g.imageRequest(ctx, h, api.ImagePull, images.PullRequest{Source: args[0], Name: name, SHA256: sha}); err != nil {
					return err
				}
			}
			return g.watchPulls(ctx, w, keys, started)
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

// watchPulls shows the pulls' progress until each is ready or failed.
func (g *globals) watchPulls(ctx context.Context, w jetstream.KeyWatcher, keys []string, started time.Time) error {
	done := map[string]images.Status{}
	var failed []string
	for len(done) < len(keys) {
		var e jetstream.KeyValueEntry
		select {
		case <-ctx.Done():
			return fmt.Errorf("stopped waiting; the pulls go on (vmctl image list shows them): %w", ctx.Err())
		case e = <-w.Updates():
		}
		if e == nil || !slices.Contains(keys, e.Key()) || e.Operation() != jetstream.KeyValuePut {
			continue
		}
		var st images.Status
		if json.Unmarshal(e.Value(), &st) != nil || st.Time.Before(started.Add(-time.Second)) {
			continue
		}
		switch st.State {
		case images.StatePulling:
			if st.TotalBytes > 0 {
				fmt.Fprintf(g.errOut, "%s %s: %s / %s (%.0f%%)\n", st.Host, st.Name, mib(st.DoneBytes), mib(st.TotalBytes), 100*float64(st.DoneBytes)/float64(st.TotalBytes))
			} else {
				fmt.Fprintf(g.errOut, "%s %s: %s\n", st.Host, st.Name, mib(st.DoneBytes))
			}
		case images.StateReady:
			done[e.Key()] = st
			g.printf("%s %s: ready, %s, %s\n", st.Host, st.Name, mib(st.Size), st.Digest)
		case images.StateFailed:
			done[e.Key()] = st
			failed = append(failed, st.Host)
			fmt.Fprintf(g.errOut, "%s %s: failed: %s\n", st.Host, st.Name, st.Error)
		}
	}
	if len(failed) > 0 {
		return &exitError{code: ExitFailed, msg: fmt.Sprintf("the pull failed on %s", strings.Join(failed, ", "))}
	}
	return nil
}

func mib(n int64) string {
	if n < 1<<20 {
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}

// imageStatuses reads VM_IMAGES (keys matching filter), by host and name.
func (g *globals) imageStatuses(ctx context.Context, filter string) ([]images.Status, error) {
	kv, err := g.imagesKV(ctx)
	if err != nil {
		return nil, err
	}
	es, err := events.KVEntries(ctx, g.js, kv.Bucket(), filter)
	if err != nil {
		return nil, err
	}
	var out []images.Status
	for _, e := range es {
		var st images.Status
		if json.Unmarshal(e.Value(), &st) == nil {
			out = append(out, st)
		}
	}
	slices.SortFunc(out, func(a, b images.Status) int {
		if c := strings.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return strings.Compare(a.Host, b.Host)
	})
	return out, nil
}

func (g *globals) imageListCmd() *cobra.Command {
	var host string
	c := &cobra.Command{
		Use:   "list",
		Short: "list the images on every host (or one)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			filter := ">"
			if host != "" {
				filter = host + ".*"
			}
			sts, err := g.imageStatuses(cmd.Context(), filter)
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
				if st.State == images.StateReady {
					size, digest = mib(st.Size), shortDigest(st.Digest)
				} else if st.State == images.StatePulling {
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
			sts, err := g.imageStatuses(cmd.Context(), "*."+args[0])
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
			sts, err := g.imageStatuses(ctx, "*."+args[0])
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
				if err := g.imageRequest(ctx, h, api.ImageRemove, images.RemoveRequest{Name: args[0]}); err != nil {
					errs = append(errs, err)
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

package vmctl

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"github.com/spf13/cobra"
)

func (g *globals) eventsCmd() *cobra.Command {
	var follow bool
	var last int
	var host string
	c := &cobra.Command{
		Use:   "events [NAME]",
		Short: "print events (of one VM, one host, or all), and with --follow keep printing new ones",
		Long: `events prints the events the stream keeps, oldest first: one VM's (NAME),
those about one host (--host: its host events and the VMs' events it wrote
or that place a VM on it), or all. --follow keeps printing new ones; it
reads without a consumer, and keeps its place when the connection or the
server goes away for a while (it says so on stderr).

--json prints one array of events, each with its stream sequence (seq);
with --follow one event per line (JSON lines), as they come.`,
		ValidArgsFunction: g.completeNames,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return nil
			}
			return nameArg(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if last < 0 {
				return usageError("--last %d: give a number of events", last)
			}
			o := client.WatchOptions{Host: host}
			if len(args) == 1 {
				if host != "" {
					return usageError("give NAME or --host, not both")
				}
				o.VM = args[0]
			}
			return g.printEvents(cmd.Context(), o, follow, last, true)
		},
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new events")
	c.Flags().IntVar(&last, "last", 0, "start with the last N events (0: all)")
	c.Flags().StringVar(&host, "host", "", "only events about this host")
	_ = c.RegisterFlagCompletionFunc("host", g.completeHosts)
	return c
}

func (g *globals) historyCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "history NAME",
		Short:             "print every event of one VM, oldest first, with its stream sequence",
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.printEvents(cmd.Context(), client.WatchOptions{VM: args[0]}, false, 0, true)
		},
	}
}

// storedJSON is an event as --json prints it: its fields and its stream
// sequence (a host event's fields, for those).
type storedJSON struct {
	Seq uint64 `json:"seq"`
	*api.Event
	*api.HostEvent
}

func (st storedJSON) MarshalJSON() ([]byte, error) {
	var body []byte
	var err error
	if st.Event != nil {
		body, err = json.Marshal(st.Event)
	} else {
		body, err = json.Marshal(st.HostEvent)
	}
	if err != nil || len(body) < 2 || body[0] != '{' {
		return body, err
	}
	sep := ","
	if len(body) == 2 {
		sep = ""
	}
	return []byte(fmt.Sprintf(`{"seq":%d%s%s`, st.Seq, sep, body[1:])), nil
}

// printEvents prints the events o selects: the last N (0: all) of those
// stored now, then, following, the new ones until ctx ends. Under --json:
// one array, or one line per event when following.
func (g *globals) printEvents(ctx context.Context, o client.WatchOptions, follow bool, last int, withSeq bool) error {
	if o.VM != "" {
		if err := api.ValidateName(o.VM); err != nil {
			return usageError("NAME %q: %s", o.VM, ruleOf(err))
		}
	}
	if err := g.conn(); err != nil {
		return err
	}
	end, err := g.c.LastSeq(ctx)
	if err != nil {
		return g.commandErr(err)
	}
	var list []client.Stored
	if end > 0 {
		ro := o
		ro.History, ro.Until = true, end
		for st, err := range g.c.Watch(ctx, ro) {
			if err != nil {
				return g.commandErr(err)
			}
			list = append(list, st)
		}
	}
	if last > 0 && len(list) > last {
		list = list[len(list)-last:]
	}
	show := func(st client.Stored) {
		seq := uint64(0)
		if withSeq {
			seq = st.Seq
		}
		switch {
		case !g.json && st.HostEvent != nil:
			fmt.Fprintln(g.out, formatHostEvent(seq, st.HostEvent))
		case !g.json:
			fmt.Fprintln(g.out, formatEvent(seq, st.Event))
		default:
			b, _ := json.Marshal(storedJSON{Seq: st.Seq, Event: st.Event, HostEvent: st.HostEvent})
			fmt.Fprintln(g.out, string(b))
		}
	}
	if g.json && !follow {
		out := make([]storedJSON, len(list))
		for i, st := range list {
			out[i] = storedJSON{Seq: st.Seq, Event: st.Event, HostEvent: st.HostEvent}
		}
		return g.printJSON(out)
	}
	for _, st := range list {
		show(st)
	}
	if !follow {
		return nil
	}
	// Following: say on stderr when the connection is down, and when it
	// is back (the watch itself keeps its place).
	p := g.newProgress("events")
	p.waitingFor("new events")
	var mu sync.Mutex
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
			}
			why := ""
			if down := g.c.DownSince(); !down.IsZero() {
				why = fmt.Sprintf("the connection to NATS is down since %s; reconnecting", down.Format("15:04:05"))
			}
			mu.Lock()
			p.trouble(why)
			mu.Unlock()
		}
	}()
	o.From = end + 1
	for st, err := range g.c.Watch(wctx, o) {
		if err != nil {
			return g.commandErr(err)
		}
		mu.Lock()
		show(st)
		mu.Unlock()
	}
	return nil
}

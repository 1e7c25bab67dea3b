package vmctl

// vmctl info and top: a VM's live counters from its worker's stats query
// (vm.query.<host>.stats, api.StatsReply), like virsh domstats and
// virt-top.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/hosts"
)

// infoDoc is what `vmctl info --json` prints: the record, one sample of
// the live counters, and the CPU use averaged over the process's uptime
// (one sample has no interval to take a rate over).
type infoDoc struct {
	Record        *api.VmRecord  `json:"record"`
	Stats         api.StatsReply `json:"stats"`
	CPUPercentAvg float64        `json:"cpu_percent_avg"`
}

// topSample is one line of `vmctl top --json`: one VM's rates between
// two samples interval_ms apart. CPU is in percent of one host CPU (a
// VM busy on two vCPUs shows 200); net rates are absent when the VM's
// NICs have no counters (nets_unavailable says why).
type topSample struct {
	VM              string         `json:"vm"`
	Host            string         `json:"host"`
	Backend         api.BackendTag `json:"backend"`
	State           api.VmState    `json:"state"`
	Time            time.Time      `json:"time"`
	IntervalMS      int64          `json:"interval_ms"`
	UptimeMS        int64          `json:"uptime_ms"`
	CPUPercent      float64        `json:"cpu_percent"`
	MemoryBytes     int64          `json:"memory_bytes"`
	RSSBytes        int64          `json:"rss_bytes"`
	DiskRdBytesPS   float64        `json:"disk_rd_bytes_per_s"`
	DiskWrBytesPS   float64        `json:"disk_wr_bytes_per_s"`
	DiskRdOpsPS     float64        `json:"disk_rd_ops_per_s"`
	DiskWrOpsPS     float64        `json:"disk_wr_ops_per_s"`
	NetRxBytesPS    *float64       `json:"net_rx_bytes_per_s,omitempty"`
	NetTxBytesPS    *float64       `json:"net_tx_bytes_per_s,omitempty"`
	NetsUnavailable string         `json:"nets_unavailable,omitempty"`
	Simulated       bool           `json:"simulated,omitempty"`
}

// topError is a line of `vmctl top --json` for a VM whose counters could
// not be read this time.
type topError struct {
	VM    string    `json:"vm"`
	Host  string    `json:"host"`
	Time  time.Time `json:"time"`
	Error string    `json:"error"`
}

// liveStats asks the worker of r's host for one sample. A VM that does
// not run, or whose host is lost, is refused before asking.
func (g *globals) liveStats(ctx context.Context, r *api.VmRecord) (api.StatsReply, error) {
	var s api.StatsReply
	if !running(r) {
		return s, notRunning(r)
	}
	if g.hostLost(ctx, r.Host) {
		return s, &exitError{code: ExitFailed, msg: fmt.Sprintf("vm %s: host %s is lost (no heartbeat for over %s): its live counters cannot be read; `vmctl hosts` shows the hosts",
			r.Name, r.Host, hosts.DefaultLostAfter)}
	}
	// The worker's errors name the VM and say why.
	err := g.query(ctx, r, "stats", &s)
	return s, err
}

func (g *globals) infoCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "info NAME",
		Short: "show a running VM's record and live counters (CPU, memory, disks, network) from its worker",
		Long: `info prints a running or suspended VM's record and one sample of its live
counters, read from its hypervisor by the worker of its host (the stats
query): state, host, backend, vCPUs, memory and the hypervisor process's
resident memory, uptime, CPU use averaged since the process started, and
each disk's and NIC's counters since then. For rates over an interval use
'vmctl top'. QEMU VMs on user-mode networking have no network counters;
the Noop backend's counters are simulated; Propolis reports none.`,
		Args:              nameArg,
		ValidArgsFunction: g.completeNames,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := g.record(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			s, err := g.liveStats(cmd.Context(), r)
			if err != nil {
				return err
			}
			doc := infoDoc{Record: r, Stats: s, CPUPercentAvg: cpuAvg(s)}
			if g.json {
				return g.printJSON(doc)
			}
			return g.printInfo(doc)
		},
	}
}

// cpuAvg is the CPU use in percent of one host CPU over the process's
// uptime.
func cpuAvg(s api.StatsReply) float64 {
	if s.UptimeMS <= 0 {
		return 0
	}
	return round1(float64(s.CPUNS) / float64(s.UptimeMS*int64(time.Millisecond)) * 100)
}

func round1(f float64) float64 { return float64(int64(f*10+0.5)) / 10 }

func (g *globals) printInfo(d infoDoc) error {
	r, s := d.Record, d.Stats
	tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "name:\t%s\n", r.Name)
	fmt.Fprintf(tw, "state:\t%s\n", s.State)
	fmt.Fprintf(tw, "host:\t%s\n", s.Host)
	fmt.Fprintf(tw, "backend:\t%s\n", s.Backend)
	if h := r.Handle; h != nil && h.Spec != nil {
		fmt.Fprintf(tw, "vcpus:\t%d\n", h.Spec.Vcpus)
	}
	fmt.Fprintf(tw, "memory:\t%s (guest); %s resident (hypervisor process)\n", bytesText(s.MemoryBytes), bytesText(s.RSSBytes))
	if s.UptimeMS > 0 {
		fmt.Fprintf(tw, "uptime:\t%s (since %s)\n", (time.Duration(s.UptimeMS) * time.Millisecond).Round(time.Second), s.StartedAt.Local().Format(time.DateTime))
		fmt.Fprintf(tw, "cpu:\t%.1f%% of one host CPU, averaged since start (%s CPU time)\n", d.CPUPercentAvg, durText(s.CPUNS))
	} else {
		fmt.Fprintf(tw, "cpu:\t%s CPU time\n", durText(s.CPUNS))
	}
	for _, v := range s.Vcpus {
		thread := "no thread of its own"
		if v.ThreadID > 0 {
			thread = "thread " + strconv.Itoa(v.ThreadID)
		}
		fmt.Fprintf(tw, "vcpu %d:\t%s CPU time (%s)\n", v.Index, durText(v.CPUNS), thread)
	}
	for _, dk := range s.Disks {
		fmt.Fprintf(tw, "disk %s:\tread %s in %d ops, written %s in %d ops\n", dk.Device, bytesText(dk.RdBytes), dk.RdOps, bytesText(dk.WrBytes), dk.WrOps)
	}
	for _, n := range s.Nets {
		fmt.Fprintf(tw, "net %s:\treceived %s in %d packets, sent %s in %d packets\n", n.Name, bytesText(n.RxBytes), n.RxPackets, bytesText(n.TxBytes), n.TxPackets)
	}
	if len(s.Nets) == 0 && s.NetsUnavailable != "" {
		fmt.Fprintf(tw, "net:\tnot available (%s)\n", s.NetsUnavailable)
	}
	if s.Simulated {
		fmt.Fprintf(tw, "note:\tthe %s backend's counters are simulated\n", s.Backend)
	}
	fmt.Fprintf(tw, "sampled:\t%s\n", s.Time.Local().Format(time.RFC3339))
	return tw.Flush()
}

func (g *globals) topCmd() *cobra.Command {
	var interval time.Duration
	var once bool
	c := &cobra.Command{
		Use:   "top [NAME...]",
		Short: "show running VMs' CPU, memory, disk and network rates, refreshed every --interval",
		Long: `top samples the live counters of the running and suspended VMs (all of
them, or the ones named) from their workers every --interval, and shows
the rates between the last two samples: CPU in percent of one host CPU
(a VM busy on two vCPUs shows 200%), the hypervisor process's resident
memory, disk bytes read and written per second, network bytes received
and sent per second by the guest ('-': no counters, e.g. user-mode
networking). The first rates appear after one interval. Ctrl-C ends it.

With --json, one JSON object per line per VM per sample (a VM whose
counters could not be read: {"vm","host","time","error"}). --once prints
one sample (two reads --interval apart) and exits.`,
		ValidArgsFunction: g.completeNames,
		Args: func(cmd *cobra.Command, args []string) error {
			for _, a := range args {
				if err := api.ValidateName(a); err != nil {
					return usageError("NAME %q: %s", a, ruleOf(err))
				}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if interval < 10*time.Millisecond {
				return usageError("--interval %s is too short (at least 10ms)", interval)
			}
			return g.top(cmd.Context(), args, interval, once)
		},
	}
	c.Flags().DurationVar(&interval, "interval", 2*time.Second, "time between samples")
	c.Flags().BoolVar(&once, "once", false, "print one sample and exit")
	return c
}

// topVMs are the records top samples this round: the named VMs (each must
// exist; on the first round each must run), else every running one.
func (g *globals) topVMs(ctx context.Context, names []string, first bool) ([]*api.VmRecord, error) {
	if len(names) == 0 {
		if err := g.conn(); err != nil {
			return nil, err
		}
		recs, err := g.c.Records(ctx)
		if err != nil {
			return nil, err
		}
		var out []*api.VmRecord
		for _, r := range recs {
			if running(r) {
				out = append(out, r)
			}
		}
		return out, nil // sorted by name
	}
	var out []*api.VmRecord
	for _, n := range names {
		r, err := g.record(ctx, n)
		if err != nil {
			return nil, err
		}
		if first && !running(r) {
			return nil, notRunning(r)
		}
		out = append(out, r)
	}
	return out, nil
}

// topRead is one VM's sample of one round, or why there is none.
type topRead struct {
	rec *api.VmRecord
	s   api.StatsReply
	err error
}

// sampleAll asks every VM's worker at once, each briefly: one slow host
// must not hold up the others' rows.
func (g *globals) sampleAll(ctx context.Context, recs []*api.VmRecord, wait time.Duration) []topRead {
	lost := g.lostHosts(ctx)
	out := make([]topRead, len(recs))
	var wg sync.WaitGroup
	for i, r := range recs {
		out[i].rec = r
		switch {
		case !running(r):
			out[i].err = fmt.Errorf("not running (state %s)", r.State)
			continue
		case lost[r.Host]:
			out[i].err = fmt.Errorf("host %s is lost", r.Host)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			qctx, cancel := context.WithTimeout(ctx, wait)
			defer cancel()
			out[i].err = g.query(qctx, r, "stats", &out[i].s)
		}()
	}
	wg.Wait()
	return out
}

func (g *globals) top(ctx context.Context, names []string, interval time.Duration, once bool) error {
	if err := g.conn(); err != nil {
		return err
	}
	f, isFile := g.out.(*os.File)
	screen := isFile && term.IsTerminal(int(f.Fd())) && !g.json && !once
	enc := json.NewEncoder(g.out) // one line per object
	wait := min(max(interval, 2*time.Second), 10*time.Second)
	prev := map[string]api.StatsReply{}
	for round := 0; ; round++ {
		recs, err := g.topVMs(ctx, names, round == 0)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		reads := g.sampleAll(ctx, recs, wait)
		if ctx.Err() != nil {
			return nil
		}
		cur := map[string]api.StatsReply{}
		var rows []topRow
		for _, rd := range reads {
			if rd.err != nil {
				rows = append(rows, topRow{rec: rd.rec, err: rd.err})
				continue
			}
			cur[rd.rec.Name] = rd.s
			if p, ok := prev[rd.rec.Name]; ok {
				if smp, ok := rates(p, rd.s); ok {
					rows = append(rows, topRow{rec: rd.rec, s: &smp})
				}
			}
		}
		prev = cur
		if round > 0 {
			now := time.Now().UTC()
			switch {
			case g.json:
				for _, r := range rows {
					if r.err != nil {
						err = enc.Encode(topError{VM: r.rec.Name, Host: r.rec.Host, Time: now, Error: r.err.Error()})
					} else {
						err = enc.Encode(r.s)
					}
					if err != nil {
						return err
					}
				}
			default:
				if screen {
					fmt.Fprint(g.out, "\033[H\033[2J")
				} else if round > 1 {
					fmt.Fprintln(g.out)
				}
				if err := g.printTop(rows, interval, now); err != nil {
					return err
				}
			}
			if once {
				return nil
			}
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// topRow is one VM's row of a round: its rates, or why it has none.
type topRow struct {
	rec *api.VmRecord
	s   *topSample
	err error
}

// rates are the VM's rates between two samples of the same process; a
// restarted process (or a moved VM) has no rates until its next sample.
func rates(a, b api.StatsReply) (topSample, bool) {
	dt := b.Time.Sub(a.Time)
	if dt <= 0 || !a.StartedAt.Equal(b.StartedAt) || b.CPUNS < a.CPUNS {
		return topSample{}, false
	}
	per := func(x, y int64) float64 { return round1(float64(y-x) / dt.Seconds()) }
	s := topSample{
		VM: b.VM, Host: b.Host, Backend: b.Backend, State: b.State, Time: b.Time,
		IntervalMS: dt.Milliseconds(), UptimeMS: b.UptimeMS,
		CPUPercent:  round1(float64(b.CPUNS-a.CPUNS) / float64(dt.Nanoseconds()) * 100),
		MemoryBytes: b.MemoryBytes, RSSBytes: b.RSSBytes,
		NetsUnavailable: b.NetsUnavailable, Simulated: b.Simulated,
	}
	ad, bd := diskTotals(a), diskTotals(b)
	s.DiskRdBytesPS, s.DiskWrBytesPS = per(ad.RdBytes, bd.RdBytes), per(ad.WrBytes, bd.WrBytes)
	s.DiskRdOpsPS, s.DiskWrOpsPS = per(ad.RdOps, bd.RdOps), per(ad.WrOps, bd.WrOps)
	if len(b.Nets) > 0 && len(a.Nets) == len(b.Nets) {
		an, bn := netTotals(a), netTotals(b)
		rx, tx := per(an.RxBytes, bn.RxBytes), per(an.TxBytes, bn.TxBytes)
		s.NetRxBytesPS, s.NetTxBytesPS = &rx, &tx
	}
	return s, true
}

func diskTotals(s api.StatsReply) api.DiskStats {
	var t api.DiskStats
	for _, d := range s.Disks {
		t.RdBytes += d.RdBytes
		t.WrBytes += d.WrBytes
		t.RdOps += d.RdOps
		t.WrOps += d.WrOps
	}
	return t
}

func netTotals(s api.StatsReply) api.NetStats {
	var t api.NetStats
	for _, n := range s.Nets {
		t.RxBytes += n.RxBytes
		t.TxBytes += n.TxBytes
	}
	return t
}

func (g *globals) printTop(rows []topRow, interval time.Duration, now time.Time) error {
	vms := "VMs"
	if len(rows) == 1 {
		vms = "VM"
	}
	fmt.Fprintf(g.out, "vmctl top: %d %s at %s, every %s\n", len(rows), vms, now.Local().Format(time.TimeOnly), interval)
	tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "NAME\tHOST\tSTATE\tCPU%\tRSS\tMEMORY\tDISK READ/s\tDISK WRITE/s\tNET RX/s\tNET TX/s\tUPTIME\t")
	var errs []string
	for _, r := range rows {
		if r.err != nil {
			fmt.Fprintf(tw, "%s\t%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t\n", r.rec.Name, r.rec.Host, r.rec.State)
			errs = append(errs, r.rec.Name+": "+r.err.Error())
			continue
		}
		s := r.s
		rx, tx := "-", "-"
		if s.NetRxBytesPS != nil {
			rx, tx = bytesText(int64(*s.NetRxBytesPS)), bytesText(int64(*s.NetTxBytesPS))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.1f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", s.VM, s.Host, s.State, s.CPUPercent,
			bytesText(s.RSSBytes), bytesText(s.MemoryBytes), bytesText(int64(s.DiskRdBytesPS)), bytesText(int64(s.DiskWrBytesPS)),
			rx, tx, (time.Duration(s.UptimeMS) * time.Millisecond).Round(time.Second))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, e := range errs {
		fmt.Fprintln(g.out, e)
	}
	return nil
}

// bytesText is n in binary units: 512B, 1.5K, 12.0M, 2.0G.
func bytesText(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + "B"
	}
	f, i := float64(n), -1
	for f >= unit && i < 4 {
		f /= unit
		i++
	}
	return strconv.FormatFloat(f, 'f', 1, 64) + string("KMGTP"[i])
}

// durText is a CPU time in nanoseconds, to the millisecond.
func durText(ns int64) string {
	return (time.Duration(ns)).Round(time.Millisecond).String()
}

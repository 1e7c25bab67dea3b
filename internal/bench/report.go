package bench

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
)

// methods describes how each figure is taken (printed and kept in the JSON).
func methods(o Options) map[string]string {
	return map[string]string{
		"1_throughput": fmt.Sprintf("Embedded nats-server (JetStream, file storage) with an engine and a Noop worker in this process, "+
			"each on its own connection. N VMs (%v) each cycle prepare, start, suspend, resume, stop, destroy: "+
			"a JetStream publish of the command, then wait for its result event, delivered from VM_EVENTS by an ordered "+
			"consumer. Transitions/s counts results arriving in a %s window after %s of warm-up. Baseline: one publisher "+
			"sending batches of 100 PublishAsync and waiting for the batch's acks (nats bench js pub async), "+
			"event-sized messages, to a file stream on the same server, %s before and after the series; the ratio uses their mean. "+
			"Server messages in/out per transition come from the server's monitoring counters over each run. "+
			"Bare pipeline (largest N, same window, same server, after the series): the same closed loop through the fewest "+
			"messages that keep a command, one decision and one result durable, with no vmherd code: the client publishes "+
			"the command to a file stream and waits for its result; a decider (256 at once, vmherd's engine default) stores a "+
			"decision per command delivered, then acks it; an executor (64 at once, the worker default) stores a result per "+
			"decision delivered, then acks it; results reach the client through an ordered consumer. No task stream, "+
			"projection, record, earlier-result look, validation or state machine: its ratio is the ceiling JetStream "+
			"and nats.go set on this machine for any design with those guarantees.",
			o.VMs, o.Measure, o.Warm, o.BaselineFor),
		"2_latency": fmt.Sprintf("Same set-up. Command latency = publish to result event delivery. One idle VM: %d commands one at a "+
			"time, %s apart, after a warm-up cycle. Offered loads %v commands/s: commands due at fixed intervals for %s, "+
			"round robin over a pool of cycling VMs; latency counts from when a command was due (no coordinated omission). "+
			"Baseline: synchronous JetStream publish round trip (publish, wait for ack), %d times, %s apart, same message size.",
			o.IdleCommands, o.Gap, o.Loads, o.LoadFor, o.IdleCommands, o.Gap),
		"3_rebuild": fmt.Sprintf("A fresh server (sync default) whose VM_EVENTS gets %d VMs x 10 events (prepare, start, suspend, "+
			"resume, stop, each accepted and answered) by async publishes. Raw replay (before and after the others; "+
			"the ratios use the mean): one ordered consumer reads the whole stream (message metadata only). Replay: projection.Replay (decode and fold). Rebuild: projection.Rebuild "+
			"(replay, drop VM_RECORDS, write every record), what `engine rebuild` runs; records are checked afterwards. "+
			"Then both again with encoding/json decoding every event instead of the events package's decodeFast (events.UseStdlibDecoder).",
			o.RebuildVMs),
		"4_scale": fmt.Sprintf("The real engine and worker binaries (go build ./cmd/engine ./cmd/worker) as separate processes "+
			"with --nats-url against an embedded server (sync default); worker --backends noop. RSS (VmRSS) and CPU "+
			"(utime+stime from /proc/<pid>/stat) over a %s idle window with 0 VMs, then %d VMs prepared (256 at a time) "+
			"and another idle window. Per-VM memory = RSS difference / VMs. Heap live after the last GC is read from "+
			"GODEBUG=gctrace=1.", o.ScaleWindow, o.ScaleVMs),
		"5_qemu": fmt.Sprintf("The repo's test guest (internal/guestimage), %d rounds. Through vmherd: engine and worker in process "+
			"with the QEMU backend, each command timed from publish to result event. Directly: qemu-img overlay, QEMU "+
			"launched daemonized with the backend's command line shape and accelerator, QMP query-status until running "+
			"(start), QMP stop / cont with query-status until paused / running (suspend, resume), system_powerdown and "+
			"wait for the process to end, polled every 1ms (stop, ACPI), removing the files (destroy). Each round runs "+
			"vmherd first, so warm caches favour the direct side. Medians; added = vmherd - direct. The worker's QEMU backend "+
			"is wrapped to time its own call of each operation, which splits vmherd's time into the backend call and the "+
			"pipeline (NATS, engine, worker; sync \"always\").", o.QEMURounds),
		"8_migrate": fmt.Sprintf("The repo's test guest, 128 MiB, accel as detected, %d rounds, migrating between two hosts on this "+
			"machine (two QEMU backends with their own data dirs; as root, each host's QEMUs run in a network namespace of "+
			"its own, the two joined by a veth pair, and the migration goes over it; else over loopback). Through vmherd: an engine and a worker per host in process (sync \"always\"), the migrate command "+
			"timed from publish to its migrated result. Directly: the QEMU backend's Receive, Send and Activate called in a "+
			"row in this process (the same QMP steps: paused -incoming copy with an NBD export, blockdev-mirror sync=top, "+
			"migrate with auto-converge, cont), no NATS, engine or worker, timed from Receive to the end of Activate. "+
			"Each round migrates the vmherd guest and then the direct one, alternating directions. Guest pause: the guest "+
			"prints a line on its console every 10 ms; the bench polls both hosts' console logs every 1 ms and takes the "+
			"time from the source's last line to the target's first.", o.MigrateRounds),
		"7_console": fmt.Sprintf("An embedded server (sync default); the worker's relay (package relay: console hub, tunnels) and a viewer "+
			"in this process on their own connections. The console's far side is a unix socket served by the bench, a stand-in "+
			"for QEMU's serial chardev socket (a real guest's UART would be the limit, not the relay). Throughput: the socket "+
			"streams %d MiB of random bytes; read straight from the socket (baseline) and by one viewer through hub and NATS "+
			"(bytes the viewer missed are reported and not counted). Keystroke round trip: one byte written, echoed by the "+
			"socket, read back, %d times 1 ms apart, directly and through the relay. Tunnel: %d MiB sent to a TCP sink "+
			"that answers one byte at the end, over a direct TCP connection (baseline) and through vmctl port-forward's "+
			"tunnel (relay.DialTunnel).", o.ConsoleMiB, map[bool]int{true: 200, false: 1000}[o.Quick], o.ConsoleMiB),
		"6_durability": "Figures 1 and 2 run once per JetStream sync setting: \"always\" (fsync every write, vmherd's default) " +
			"and \"default\" (nats-server's sync_interval of 2 minutes). The baselines run on the same server, so they share the setting.",
	}
}

// targets checks the goals.
func targets(rep *Report) []Target {
	var ts []Target
	for _, p := range rep.Pipeline {
		if n := len(p.Throughput); n > 0 {
			t := p.Throughput[n-1]
			ts = append(ts, Target{
				Name: fmt.Sprintf("throughput at N=%d, sync %s", t.VMs, p.Sync), Goal: ">= 1/5 of JetStream async publish rate",
				Value: t.Ratio, Shown: fmt.Sprintf("%.0f/s = %.3f x %.0f/s", t.PerS, t.Ratio, p.AsyncPubMean), Met: t.Ratio >= 0.2,
			}, Target{
				Name: fmt.Sprintf("server messages per transition at N=%d, sync %s", t.VMs, p.Sync), Goal: "<= 4 in / <= 6 out",
				Value: t.MsgsInPer, Shown: fmt.Sprintf("%.1f in / %.1f out", t.MsgsInPer, t.MsgsOutPer), Met: t.MsgsInPer <= 4 && t.MsgsOutPer <= 6,
			})
		}
		for _, l := range p.Latency {
			if l.VMs != 1 {
				continue
			}
			if p.Sync == "always" {
				// Four fsynced writes are on a command's way; the goal is
				// relative to one fsynced publish round trip.
				ts = append(ts, Target{
					Name: "p99 latency, 1 idle VM, sync always", Goal: "< 3x the sync publish p99",
					Value: l.RatioP99, Shown: fmt.Sprintf("%.2f ms = %.1f x %.2f ms", l.Latency.P99, l.RatioP99, l.Baseline.P99), Met: l.RatioP99 < 3,
				})
				continue
			}
			ts = append(ts, Target{
				Name: "p99 latency, 1 idle VM, sync " + p.Sync, Goal: "< 5 ms",
				Value: l.Latency.P99, Shown: fmt.Sprintf("%.2f ms", l.Latency.P99), Met: l.Latency.P99 < 5,
			})
		}
	}
	if r := rep.Rebuild; r != nil && r.Events > 0 {
		ts = append(ts, Target{
			Name: "rebuild rate", Goal: ">= 1/2 of raw ordered-consumer replay",
			Value: r.Ratio, Shown: fmt.Sprintf("%.0f/s = %.2f x %.0f/s", r.RebuildPerS, r.Ratio, r.RawPerS), Met: r.Ratio >= 0.5,
		})
	}
	if s := rep.Scale; s != nil && s.VMs > 0 && s.PrepareSeconds > 0 {
		ts = append(ts, Target{
			Name: "engine memory per idle VM", Goal: "< 4 KiB",
			Value: s.Engine.PerVMBytes, Shown: fmt.Sprintf("%.0f B (RSS)", s.Engine.PerVMBytes), Met: s.Engine.PerVMBytes < 4096,
		})
	}
	if q := rep.QEMU; q != nil && q.Skipped == "" && len(q.Ops) > 0 {
		worst := q.Ops[0]
		for _, o := range q.Ops {
			if o.AddedMs > worst.AddedMs {
				worst = o
			}
		}
		ts = append(ts, Target{
			Name: "added time on QEMU ops (worst median)", Goal: "< 10 ms per op",
			Value: worst.AddedMs, Shown: fmt.Sprintf("%.1f ms (%s)", worst.AddedMs, worst.Op), Met: worst.AddedMs < 10,
		})
	}
	if m := rep.Migrate; m != nil && m.Skipped == "" && len(m.VmherdMs) > 0 {
		ts = append(ts, Target{
			Name: "live migration total time", Goal: "<= 1.5x direct QMP",
			Value: m.Ratio, Shown: fmt.Sprintf("%.0f ms = %.2f x %.0f ms", m.VmherdMed, m.Ratio, m.DirectMed), Met: m.Ratio <= 1.5,
		}, Target{
			Name: "live migration guest downtime", Goal: "<= direct + 100 ms",
			Value: m.VmherdDownMed - m.DirectDownMed, Shown: fmt.Sprintf("%.0f ms vs %.0f ms direct", m.VmherdDownMed, m.DirectDownMed),
			Met: m.VmherdDownMed <= m.DirectDownMed+100,
		})
	}
	return ts
}

func printReport(w io.Writer, rep *Report) {
	e := rep.Environment
	fmt.Fprintf(w, "\nvmherd benchmark (%s mode), %s, %.0fs\n", rep.Mode, rep.Started.Format("2006-01-02 15:04 MST"), rep.Seconds)
	fmt.Fprintf(w, "environment: %s, %d cores (GOMAXPROCS %d), %d MiB; Linux %s; %s; %s\n", e.CPU, e.Cores, e.GOMAXPROCS, e.MemoryMiB, e.Kernel, e.GoVersion, e.NATSServer)
	fmt.Fprintf(w, "storage: %s (%s); load average %s at start, %s at end\n", e.WorkDirFSType, e.Storage, e.LoadAvgAtBeg, e.LoadAvgAtEnd)
	if e.QEMU != "" {
		fmt.Fprintf(w, "qemu: %s\n", e.QEMU)
	}
	fmt.Fprintf(w, "sync settings: %s\n", e.SyncSettings)
	fmt.Fprintf(w, "\nmethod\n")
	keys := make([]string, 0, len(rep.Method))
	for k := range rep.Method {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(w, "%s\n", wrap(k+": "+rep.Method[k], 100, "   "))
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	defer tw.Flush()
	line := func(cells ...string) { fmt.Fprintln(tw, strings.Join(cells, "\t")+"\t") }

	for _, p := range rep.Pipeline {
		if len(p.Throughput) > 0 {
			tw.Flush()
			fmt.Fprintf(w, "\n1. pipeline throughput, Noop backend, sync %s (baseline: async publish %.0f msgs/s before, %.0f after)\n",
				p.Sync, p.AsyncPubBefore.MsgsPerS, p.AsyncPubAfter.MsgsPerS)
			line("VMs", "transitions/s", "async pub msgs/s", "ratio", "p50 ms", "p99 ms", "server msgs in/out per transition", "errors")
			for _, t := range p.Throughput {
				line(fmt.Sprint(t.VMs), f0(t.PerS), f0(t.BaselineMsgsS), f3(t.Ratio), f2(t.Latency.P50), f2(t.Latency.P99),
					f1(t.MsgsInPer)+" / "+f1(t.MsgsOutPer), fmt.Sprint(t.Errors))
			}
			if b := p.Bare; b != nil {
				line("bare "+fmt.Sprint(b.VMs), f0(b.PerS), f0(b.BaselineMsgsS), f3(b.Ratio), f2(b.Latency.P50), f2(b.Latency.P99),
					f1(b.MsgsInPer)+" / "+f1(b.MsgsOutPer), fmt.Sprint(b.Errors))
			}
			tw.Flush()
			fmt.Fprintf(w, "   (the async publish baseline costs the server %.1f in / %.1f out per message; \"bare\": the same closed loop through\n"+
				"   three stored writes per transition and no vmherd code, the ceiling JetStream sets for its guarantees, see Method)\n",
				p.AsyncPubBefore.MsgsInPer, p.AsyncPubBefore.MsgsOutPer)
		}
		if len(p.Latency) > 0 {
			tw.Flush()
			fmt.Fprintf(w, "\n2. command latency publish -> result, sync %s (baseline: sync publish round trip p50 %.3f p90 %.3f p99 %.3f max %.3f ms)\n",
				p.Sync, p.SyncPub.P50, p.SyncPub.P90, p.SyncPub.P99, p.SyncPub.Max)
			line("load", "achieved/s", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "p50 ratio", "p99 ratio", "errors")
			for _, l := range p.Latency {
				ach := "-"
				if l.AchievedPer > 0 {
					ach = f0(l.AchievedPer)
				}
				line(l.Load, ach, fmt.Sprint(l.Latency.N), f2(l.Latency.P50), f2(l.Latency.P90), f2(l.Latency.P99), f2(l.Latency.Max),
					f1(l.RatioP50), f1(l.RatioP99), fmt.Sprint(l.Errors))
			}
			for _, l := range p.Latency {
				if len(l.Stages) == 0 {
					continue
				}
				tw.Flush()
				var parts []string
				for _, st := range l.Stages {
					parts = append(parts, fmt.Sprintf("%s %.2f", st.Name, st.MedianMs))
				}
				fmt.Fprintf(w, "   idle VM, where the time goes (medians, ms, from stream timestamps): %s\n", strings.Join(parts, "; "))
			}
		}
	}
	if r := rep.Rebuild; r != nil && r.Events > 0 {
		tw.Flush()
		fmt.Fprintf(w, "\n3. projection rebuild, %d events over %d VMs (%.0f MB; written at %.0f events/s)\n", r.Events, r.VMs, float64(r.StreamBytes)/1e6, r.WritePerS)
		line("pass", "seconds", "events/s", "ratio to raw")
		line(fmt.Sprintf("raw ordered-consumer replay (baseline; %.0f before, %.0f after)", r.RawBeforeS, r.RawAfterS), f2(r.RawSeconds), f0(r.RawPerS), "1.00")
		line("projection.Replay (decode+fold)", f2(r.ReplaySeconds), f0(r.ReplayPerS), f2(r.RatioReplay))
		line("projection.Rebuild (+ write VM_RECORDS)", f2(r.RebuildSeconds), f0(r.RebuildPerS), f2(r.Ratio))
		line("projection.Replay, encoding/json decoding", f2(r.ReplayStdSeconds), f0(r.ReplayStdPerS), f2(r.RatioReplayStd))
		line("projection.Rebuild, encoding/json decoding", f2(r.RebuildStdSeconds), f0(r.RebuildStdPerS), f2(r.RatioStd))
	}
	if s := rep.Scale; s != nil && s.VMs > 0 {
		tw.Flush()
		fmt.Fprintf(w, "\n4. scale: %d VMs prepared (%.0f/s, %d errors) and idle, engine and worker as processes\n", s.VMs, s.PreparePerS, s.Errors)
		line("process", "RSS 0 VMs MiB", "RSS n VMs MiB", "bytes/VM (RSS)", "heap bytes/VM", "idle CPU % (0)", "idle CPU % (n)", "prepare CPU us/VM")
		for _, x := range []struct {
			n string
			p ScaleProc
		}{{"engine", s.Engine}, {"worker", s.Worker}} {
			line(x.n, f1(float64(x.p.Idle0.RSSKiB)/1024), f1(float64(x.p.IdleN.RSSKiB)/1024), f0(x.p.PerVMBytes), f0(x.p.HeapPerVMBytes),
				f1(x.p.Idle0.CPUPct), f1(x.p.IdleN.CPUPct), f0(x.p.PrepareCPUus))
		}
	}
	if q := rep.QEMU; q != nil {
		tw.Flush()
		if q.Skipped != "" {
			fmt.Fprintf(w, "\n5. QEMU: skipped: %s\n", q.Skipped)
		} else {
			fmt.Fprintf(w, "\n5. QEMU operations, test guest, accel %s, %d rounds (vmherd prepare %.0f ms, guest boot %.0f ms, medians)\n", q.Accel, q.Iterations, q.PrepareMs, q.BootMs)
			line("op", "vmherd ms", "direct ms", "added ms", "ratio", "of which backend call ms", "pipeline ms")
			for _, o := range q.Ops {
				line(o.Op, f1(o.VmherdMs), f1(o.DirectMs), f1(o.AddedMs), f2(o.Ratio), f1(o.BackendMs), f1(o.PipelineMs))
			}
		}
		tw.Flush()
		fmt.Fprintf(w, "   libvirt: %s\n", q.Libvirt)
	}
	if c := rep.Console; c != nil && c.Bytes > 0 {
		tw.Flush()
		fmt.Fprintf(w, "\n6. console and tunnel relay over NATS (%d MiB)\n", c.Bytes>>20)
		line("measure", "direct", "relay", "ratio")
		line("console output MiB/s", f1(c.DirectMiBs), f1(c.RelayMiBs)+fmt.Sprintf(" (%d B lost)", c.RelayLost), f2(c.Ratio))
		line("keystroke round trip p50 ms", f3(c.DirectRTT.P50), f3(c.RelayRTT.P50), f1(c.RTTRatio))
		line("keystroke round trip p99 ms", f3(c.DirectRTT.P99), f3(c.RelayRTT.P99), f1(ratio(c.RelayRTT.P99, c.DirectRTT.P99)))
		line("tunnel MiB/s (direct: TCP)", f1(c.TCPMiBs), f1(c.TunnelMiBs), f2(c.TunnelRatio))
	}
	if m := rep.Migrate; m != nil {
		tw.Flush()
		if m.Skipped != "" {
			fmt.Fprintf(w, "\n7. live migration: skipped: %s\n", m.Skipped)
		} else {
			fmt.Fprintf(w, "\n7. live migration of the idle test guest between two hosts, %d rounds (medians); network: %s\n", m.Rounds, m.Network)
			line("measure", "direct", "vmherd", "ratio")
			line("total ms", f0(m.DirectMed), f0(m.VmherdMed), f2(m.Ratio))
			line("guest paused ms (console counter)", f0(m.DirectDownMed), f0(m.VmherdDownMed), f2(ratio(m.VmherdDownMed, m.DirectDownMed)))
			line("downtime ms as QEMU reports it", f0(m.DirectQEMUDownMed), f0(m.VmherdQEMUDownMed), "")
		}
	}
	tw.Flush()
	fmt.Fprintf(w, "\ntargets\n")
	for _, t := range rep.Targets {
		mark := "MISSED"
		if t.Met {
			mark = "met"
		}
		line(t.Name, t.Goal, t.Shown, mark)
	}
	for _, f := range rep.Failures {
		tw.Flush()
		fmt.Fprintf(w, "FAILED: %s\n", f)
	}
}

func f0(x float64) string { return fmt.Sprintf("%.0f", x) }
func f1(x float64) string { return fmt.Sprintf("%.1f", x) }
func f2(x float64) string { return fmt.Sprintf("%.2f", x) }
func f3(x float64) string { return fmt.Sprintf("%.3f", x) }

// wrap breaks s into lines of at most width, indenting the ones after the first.
func wrap(s string, width int, indent string) string {
	var b strings.Builder
	n := 0
	for i, word := range strings.Fields(s) {
		if i > 0 && n+1+len(word) > width {
			b.WriteString("\n" + indent)
			n = len(indent)
		} else if i > 0 {
			b.WriteByte(' ')
			n++
		}
		b.WriteString(word)
		n += len(word)
	}
	return b.String()
}

package bench

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Throughput is figure 1 for one VM count.
type Throughput struct {
	VMs           int     `json:"vms"`
	Transitions   int64   `json:"transitions"`
	Seconds       float64 `json:"seconds"`
	PerS          float64 `json:"transitions_per_s"`
	Ratio         float64 `json:"ratio_to_async_pub"`
	Errors        int64   `json:"errors"`
	Latency       Dist    `json:"latency"`
	BaselineMsgsS float64 `json:"baseline_async_pub_msgs_per_s"`
	// Server messages per transition over the whole run (warm-up and
	// drain included): what the pipeline costs the server.
	MsgsInPer  float64 `json:"server_msgs_in_per_transition"`
	MsgsOutPer float64 `json:"server_msgs_out_per_transition"`
}

// throughput runs n VMs through the lifecycle at once, each issuing its
// next command as soon as the last one's result arrived (a closed loop),
// for warm+measure, and counts the commands whose result arrived in the
// measure window.
func throughput(ctx context.Context, cl *client, srv *server, prefix string, n int, warm, measure time.Duration) (Throughput, error) {
	return closedLoop(ctx, srv, n, warm, measure, func(i int) sendFunc {
		v := newCycler(fmt.Sprintf("%s-%04d", prefix, i))
		return func(ctx context.Context) (time.Time, time.Time, bool, error) {
			action, id := v.next()
			sent, o, err := cl.do(ctx, v.name, action, id)
			if err != nil {
				return sent, time.Time{}, false, err
			}
			v.done(o)
			return sent, o.At, o.ok(), nil
		}
	})
}

// sendFunc sends one command and returns when its result arrived: when
// it was sent, when the result arrived, and whether it succeeded.
type sendFunc func(ctx context.Context) (sent, at time.Time, ok bool, err error)

// closedLoop runs n senders at once (sender(i) makes the i-th), each
// sending its next command as soon as the last one's result arrived, for
// warm+measure. It counts the results that arrive in the measure window
// and their latencies, and the server's messages per command over the
// whole run (warm-up and drain included).
func closedLoop(ctx context.Context, srv *server, n int, warm, measure time.Duration, sender func(i int) sendFunc) (Throughput, error) {
	in0, out0 := srv.msgs()
	var all atomic.Int64
	start := time.Now()

	from, end := start.Add(warm), start.Add(warm+measure)
	var count, errs atomic.Int64
	var mu sync.Mutex
	var lats []time.Duration
	var firstErr error
	var wg sync.WaitGroup
	// A command still waiting well after the window is lost, not slow.
	cctx, cancel := context.WithDeadline(ctx, end.Add(60*time.Second))
	defer cancel()
	for i := range n {
		wg.Go(func() {
			send := sender(i)
			var mine []time.Duration
			for time.Now().Before(end) {
				sent, at, ok, err := send(cctx)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				all.Add(1)
				if !ok {
					errs.Add(1)
				}
				if at.After(from) && !at.After(end) {
					count.Add(1)
					mine = append(mine, at.Sub(sent))
				}
			}
			mu.Lock()
			lats = append(lats, mine...)
			mu.Unlock()
		})
	}
	wg.Wait()
	if firstErr != nil {
		return Throughput{}, firstErr
	}
	secs := measure.Seconds()
	in1, out1 := srv.msgs()
	return Throughput{
		VMs: n, Transitions: count.Load(), Seconds: secs, PerS: float64(count.Load()) / secs,
		Errors: errs.Load(), Latency: dist(lats),
		MsgsInPer: ratio(float64(in1-in0), float64(all.Load())), MsgsOutPer: ratio(float64(out1-out0), float64(all.Load())),
	}, nil
}

// Latency is figure 2 for one load.
type Latency struct {
	Load        string  `json:"load"`
	OfferedPerS float64 `json:"offered_per_s,omitempty"`
	AchievedPer float64 `json:"achieved_per_s,omitempty"`
	VMs         int     `json:"vms"`
	Errors      int64   `json:"errors"`
	Latency     Dist    `json:"latency"`
	Baseline    Dist    `json:"baseline_sync_pub"`
	RatioP50    float64 `json:"ratio_p50_to_sync_pub"`
	RatioP99    float64 `json:"ratio_p99_to_sync_pub"`
	// Stages split the idle VM's commands by the stream timestamps of the
	// command, its accepted event and its result (medians, ms).
	Stages []Stage `json:"stages,omitempty"`
}

// Stage is one leg of a command's way, with its median time.
type Stage struct {
	Name     string  `json:"name"`
	MedianMs float64 `json:"median_ms"`
}

// openLoop offers rate commands per second for d, round robin over a pool
// of VMs each cycling through the lifecycle. A command's latency counts
// from when it was due, not when a VM was free to send it, so a pipeline
// that falls behind shows it in the latency (no coordinated omission).
func openLoop(ctx context.Context, cl *client, prefix string, rate float64, pool int, d time.Duration) (Latency, error) {
	type vmw struct {
		c  *cycler
		ch chan time.Time
	}
	idle := make(chan *vmw, pool)
	var mu sync.Mutex
	var lats []time.Duration
	var errs atomic.Int64
	var firstErr error
	var wg sync.WaitGroup
	cctx, cancel := context.WithTimeout(ctx, d+60*time.Second)
	defer cancel()
	for i := range pool {
		w := &vmw{c: newCycler(fmt.Sprintf("%s-%04d", prefix, i)), ch: make(chan time.Time, 1)}
		idle <- w
		wg.Go(func() {
			for due := range w.ch {
				action, id := w.c.next()
				_, o, err := cl.do(cctx, w.c.name, action, id)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					idle <- w
					continue
				}
				w.c.done(o)
				if !o.ok() {
					errs.Add(1)
				}
				mu.Lock()
				lats = append(lats, o.At.Sub(due))
				mu.Unlock()
				idle <- w
			}
		})
	}
	interval := time.Duration(float64(time.Second) / rate)
	start := time.Now()
	total := int(rate * d.Seconds())
	var all []*vmw
	for i := range total {
		due := start.Add(time.Duration(i) * interval)
		if w := time.Until(due); w > 0 {
			time.Sleep(w)
		}
		var w *vmw
		select {
		case w = <-idle:
		case <-cctx.Done():
			return Latency{}, cctx.Err()
		}
		w.ch <- due
	}
	// Every VM back in the idle pool means every command has its outcome.
	for range pool {
		select {
		case w := <-idle:
			all = append(all, w)
		case <-cctx.Done():
			return Latency{}, fmt.Errorf("open loop at %.0f/s: results still missing: %w", rate, cctx.Err())
		}
	}
	elapsed := time.Since(start)
	for _, w := range all {
		close(w.ch)
	}
	wg.Wait()
	if firstErr != nil {
		return Latency{}, firstErr
	}
	return Latency{
		Load: fmt.Sprintf("%.0f/s", rate), OfferedPerS: rate, AchievedPer: float64(total) / elapsed.Seconds(),
		VMs: pool, Errors: errs.Load(), Latency: dist(lats),
	}, nil
}

// idleVM sends n commands to one VM, one at a time with gap between a
// result and the next command, with nothing else running.
func idleVM(ctx context.Context, cl *client, name string, n int, gap time.Duration) (Latency, error) {
	v := newCycler(name)
	var lats []time.Duration
	var errs int64
	type timing struct{ sent, got time.Time }
	times := map[string]timing{}
	for i := range n + len(lifecycle) {
		action, id := v.next()
		cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		sent, o, err := cl.do(cctx, v.name, action, id)
		cancel()
		if err != nil {
			return Latency{}, err
		}
		v.done(o)
		if !o.ok() {
			errs++
		}
		if i >= len(lifecycle) { // the first cycle warms up
			lats = append(lats, o.At.Sub(sent))
			times[id] = timing{sent, o.At}
		}
		time.Sleep(gap)
	}
	l := Latency{Load: "1 idle VM", VMs: 1, Errors: errs, Latency: dist(lats)}
	stored, err := cl.storedTimes(ctx, name)
	if err != nil {
		return l, err
	}
	var legs [4][]float64
	for id, t := range times {
		st, ok := stored[id]
		if !ok || st.cmd.IsZero() || st.accepted.IsZero() || st.result.IsZero() {
			continue
		}
		legs[0] = append(legs[0], ms(st.cmd.Sub(t.sent)))
		legs[1] = append(legs[1], ms(st.accepted.Sub(st.cmd)))
		legs[2] = append(legs[2], ms(st.result.Sub(st.accepted)))
		legs[3] = append(legs[3], ms(t.got.Sub(st.result)))
	}
	for i, name := range []string{
		"publish -> command stored",
		"command stored -> accepted stored (engine)",
		"accepted stored -> result stored (task, worker, backend)",
		"result stored -> result delivered",
	} {
		l.Stages = append(l.Stages, Stage{Name: name, MedianMs: median(legs[i])})
	}
	return l, nil
}

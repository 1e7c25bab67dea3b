package e2e_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
	"github.com/vmherd/vmherd/internal/vmctl"
	"github.com/vmherd/vmherd/schemas"
)

// infoJSON is what `vmctl info --json` must print, and nothing else.
type infoJSON struct {
	Record        api.VmRecord   `json:"record"`
	Stats         api.StatsReply `json:"stats"`
	CPUPercentAvg float64        `json:"cpu_percent_avg"`
}

// topJSON is one line of `vmctl top --json`, and nothing else.
type topJSON struct {
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
	NetRxBytesPS    *float64       `json:"net_rx_bytes_per_s"`
	NetTxBytesPS    *float64       `json:"net_tx_bytes_per_s"`
	NetsUnavailable string         `json:"nets_unavailable"`
	Simulated       bool           `json:"simulated"`
}

// strict decodes exactly one JSON value of type T from b: unknown fields
// and trailing data are errors.
func strict[T any](t *testing.T, b []byte) T {
	t.Helper()
	var v T
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("decoding %T: %v\n%s", v, err, b)
	}
	if dec.More() {
		t.Fatalf("more than one JSON value:\n%s", b)
	}
	return v
}

// TestVmctlInfoTop: `vmctl info` and `vmctl top` against an engine and a
// Noop worker, whose counters are simulated at known rates: the JSON
// parses strictly, the stats reply passes its schema, the counters grow
// between samples and the rates are the simulated ones; a VM that does
// not run or does not exist is refused with exit 1 and a clear message.
func TestVmctlInfoTop(t *testing.T) {
	env, _, _ := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	run := func(args ...string) (string, string, int) {
		var out, errOut syncbuf.Buffer
		code := vmctl.Run(ctx, append([]string{"--server", env.URL}, args...), &out, &errOut)
		return out.String(), errOut.String(), code
	}
	for _, args := range [][]string{
		{"create", "web1", "--backend", "noop", "--vcpus", "2", "--memory", "256", "--start"},
		{"create", "web2", "--backend", "noop", "--start"},
		{"create", "idle", "--backend", "noop"},
		{"suspend", "web2"},
	} {
		if out, errOut, code := run(args...); code != 0 {
			t.Fatalf("vmctl %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
		}
	}

	// info: one document, twice, the counters growing in between.
	info := func(name string) (infoJSON, time.Duration) {
		t.Helper()
		began := time.Now()
		out, errOut, code := run("info", name, "--json")
		took := time.Since(began)
		if code != 0 {
			t.Fatalf("vmctl info %s --json: exit %d\n%s%s", name, code, out, errOut)
		}
		doc := strict[infoJSON](t, []byte(out))
		var raw struct {
			Stats json.RawMessage `json:"stats"`
		}
		_ = json.Unmarshal([]byte(out), &raw)
		if err := schemas.Validate("stats", raw.Stats); err != nil {
			t.Fatalf("the stats reply breaks schemas/stats.json: %v\n%s", err, raw.Stats)
		}
		return doc, took
	}
	a, took := info("web1")
	t.Logf("vmctl info web1 --json took %s (connect, record, host check, stats query)", took.Round(time.Millisecond))
	s := a.Stats
	if a.Record.Name != "web1" || a.Record.State != api.StateRunning || s.VM != "web1" || s.Host != "h1" || s.Backend != api.BackendNoop ||
		s.State != api.StateRunning || !s.Simulated || s.MemoryBytes != 256<<20 || s.RSSBytes < 32<<20 || len(s.Vcpus) != 2 ||
		len(s.Disks) != 1 || s.Disks[0].Device != "vda" || len(s.Nets) != 1 || s.Nets[0].Name != "sim0" || s.StartedAt.IsZero() {
		t.Fatalf("info web1: %+v", a)
	}
	time.Sleep(300 * time.Millisecond)
	b, _ := info("web1")
	if b.Stats.CPUNS <= s.CPUNS || b.Stats.Disks[0].WrBytes <= s.Disks[0].WrBytes || b.Stats.Nets[0].RxBytes <= s.Nets[0].RxBytes ||
		b.Stats.UptimeMS <= s.UptimeMS || !b.Stats.Time.After(s.Time) {
		t.Fatalf("counters did not grow in 300ms:\n%+v\n%+v", s, b.Stats)
	}
	// Two vCPUs each a fifth busy: 40% of one CPU on average.
	if math.Abs(b.CPUPercentAvg-40) > 2 {
		t.Errorf("cpu_percent_avg %.1f, want about 40 (simulated: 2 vCPUs at 20%%)", b.CPUPercentAvg)
	}
	// The text form names what it shows.
	out, errOut, code := run("info", "web1")
	for _, want := range []string{"state:", "running", "host:", "h1", "vcpus:", "memory:", "256.0M (guest)", "uptime:", "cpu:", "disk vda:", "net sim0:", "simulated"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("vmctl info web1 (exit %d) lacks %q:\n%s%s", code, want, out, errOut)
		}
	}
	// A suspended VM has counters too; they stand still.
	c, _ := info("web2")
	time.Sleep(200 * time.Millisecond)
	d, _ := info("web2")
	if c.Stats.State != api.StateSuspended || d.Stats.CPUNS != c.Stats.CPUNS {
		t.Errorf("suspended web2: state %s, cpu_ns %d then %d (want equal)", c.Stats.State, c.Stats.CPUNS, d.Stats.CPUNS)
	}

	// top --once --json: one line per running VM, two reads 500ms apart.
	began := time.Now()
	out, errOut, code = run("top", "--once", "--json", "--interval", "500ms")
	t.Logf("vmctl top --once --json --interval 500ms took %s", time.Since(began).Round(time.Millisecond))
	if code != 0 {
		t.Fatalf("vmctl top --once --json: exit %d\n%s%s", code, out, errOut)
	}
	lines := map[string]topJSON{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		l := strict[topJSON](t, sc.Bytes())
		lines[l.VM] = l
	}
	if len(lines) != 2 || strings.Count(out, "\n") != 2 {
		t.Fatalf("top --once --json printed %d lines for %d VMs, want 2 (web1, web2; idle does not run):\n%s", strings.Count(out, "\n"), len(lines), out)
	}
	w1, w2 := lines["web1"], lines["web2"]
	near := func(what string, got, want, tol float64) {
		t.Helper()
		if math.Abs(got-want) > tol {
			t.Errorf("web1 %s = %.1f, want %.1f ± %.1f", what, got, want, tol)
		}
	}
	if w1.Host != "h1" || w1.State != api.StateRunning || w1.IntervalMS < 450 || w1.RSSBytes <= 0 || w1.NetRxBytesPS == nil || !w1.Simulated {
		t.Fatalf("top line of web1: %+v", w1)
	}
	near("cpu_percent", w1.CPUPercent, 40, 2)
	near("disk_wr_bytes_per_s", w1.DiskWrBytesPS, 16<<10, 800)
	near("disk_rd_bytes_per_s", w1.DiskRdBytesPS, 64<<10, 3200)
	near("net_rx_bytes_per_s", *w1.NetRxBytesPS, 2<<10, 100)
	if w2.State != api.StateSuspended || w2.CPUPercent != 0 || w2.DiskWrBytesPS != 0 {
		t.Errorf("top line of suspended web2: %+v", w2)
	}
	// Named, as a table.
	out, errOut, code = run("top", "web1", "--once", "--interval", "200ms")
	if code != 0 || !strings.Contains(out, "CPU%") || !strings.Contains(out, "web1") || strings.Contains(out, "web2") {
		t.Fatalf("vmctl top web1 --once: exit %d\n%s%s", code, out, errOut)
	}

	// Refusals: exit 1, saying why and what to do.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"info", "idle"}, "vm idle is not running (state prepared); start it with `vmctl start idle`"},
		{[]string{"info", "idle", "--json"}, "vm idle is not running (state prepared)"},
		{[]string{"info", "nosuch", "--json"}, "no VM named nosuch"},
		{[]string{"top", "--once", "web1", "idle"}, "vm idle is not running (state prepared)"},
		{[]string{"top", "--once", "nosuch"}, "no VM named nosuch"},
	} {
		out, errOut, code := run(c.args...)
		if code != vmctl.ExitFailed || !strings.Contains(errOut, c.want) {
			t.Errorf("vmctl %s: exit %d, stdout %q, stderr %q; want exit 1 and %q", strings.Join(c.args, " "), code, out, errOut, c.want)
		}
		// With --json the error is a JSON document on stdout, too.
		if slices.Contains(c.args, "--json") {
			doc := strict[struct {
				Error struct {
					Kind     string `json:"kind"`
					ExitCode int    `json:"exit_code"`
					Message  string `json:"message"`
				} `json:"error"`
			}](t, []byte(out))
			if doc.Error.ExitCode != vmctl.ExitFailed || !strings.Contains(doc.Error.Message, c.want) {
				t.Errorf("vmctl %s: error document %+v", strings.Join(c.args, " "), doc)
			}
		} else if out != "" {
			t.Errorf("vmctl %s: stdout %q, want nothing", strings.Join(c.args, " "), out)
		}
	}
	if _, errOut, code := run("top", "--interval", "0s"); code != vmctl.ExitUsage {
		t.Errorf("top --interval 0s: exit %d, want 2: %s", code, errOut)
	}
}

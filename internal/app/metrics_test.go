package app_test

import (
	"io"
	"net/http"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/datadir"
	"github.com/vmherd/vmherd/internal/testenv"
)

// scrape reads the value of the first sample matching series (a regexp
// over the exposition line before the value).
func scrape(t *testing.T, url, series string) (float64, bool) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s\n%s", url, resp.Status, body)
	}
	m := regexp.MustCompile(`(?m)^` + series + ` ([0-9.e+-]+)$`).FindSubmatch(body)
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return v, true
}

// The engine with --metrics-listen serves Prometheus metrics, its local
// worker's included: commands by action and outcome, latencies, VMs by
// state, host heartbeats, backend calls.
func TestEngineMetrics(t *testing.T) {
	bin := testenv.Binaries(t)
	port, mport := testenv.FreePort(t), testenv.FreePort(t)
	murl := "http://" + testenv.Addr(mport) + "/metrics"
	dir := filepath.Join(t.TempDir(), "data")
	p := testenv.StartProc(t, "engine", filepath.Join(bin, "engine"), nil,
		"--data-dir", dir, "--listen", testenv.Addr(port),
		"--with-worker", "--backends", "noop", "--host", "box1", "--metrics-listen", testenv.Addr(mport))
	p.WaitLog("engine serving", 60*time.Second)
	env := testenv.AttachCreds(t, "nats://"+testenv.Addr(port), datadir.AdminCreds(dir))
	env.SendCmd("m1", "prepare", "p", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("m1", "p", 30*time.Second)
	env.SendCmd("m1", "start", "s", api.Command{})
	env.Result("m1", "s", 30*time.Second)
	env.SendCmd("m1", "suspend", "bad", api.Command{Spec: &api.VmSpec{}}) // a spec on suspend: rejected
	env.Decision("m1", "bad", 30*time.Second)

	want := map[string]float64{
		`vmherd_commands_total\{action="prepare",outcome="accepted"\}`:         1,
		`vmherd_commands_total\{action="start",outcome="accepted"\}`:           1,
		`vmherd_commands_total\{action="suspend",outcome="rejected"\}`:         1,
		`vmherd_decision_seconds_count\{action="prepare",outcome="accepted"\}`: 1,
		`vmherd_task_seconds_count\{action="start",result="started"\}`:         1,
		`vmherd_backend_call_seconds_count\{action="prepare",backend="noop"\}`: 1,
		`vmherd_vms\{state="running"\}`:                                        1,
		`vmherd_host_up\{host="box1"\}`:                                        1,
		`vmherd_host_cordoned\{host="box1"\}`:                                  0,
	}
	env.WaitFor("metrics", 10*time.Second, func() bool {
		for series, v := range want {
			if got, ok := scrape(t, murl, series); !ok || got != v {
				return false
			}
		}
		return true
	})
	for series, v := range want {
		if got, ok := scrape(t, murl, series); !ok || got != v {
			t.Errorf("%s = %v (present %v), want %v", series, got, ok, v)
		}
	}
	if age, ok := scrape(t, murl, `vmherd_host_heartbeat_age_seconds\{host="box1"\}`); !ok || age > 10 {
		t.Errorf("heartbeat age of box1: %v (present %v)", age, ok)
	}
}

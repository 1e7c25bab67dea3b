package e2e_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/propolis"
	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
	"github.com/vmherd/vmherd/internal/backends/propolis/fake"
	"github.com/vmherd/vmherd/internal/relay"
	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
	"github.com/vmherd/vmherd/internal/vmctl"
)

// propolisWorker starts a worker whose default backend is propolis, with
// one already-running (fake) propolis-server at addr.
func propolisWorker(t *testing.T, env *testenv.Env, host, addr string) {
	t.Helper()
	b, err := propolis.New(propolis.Options{Servers: []string{addr}, Host: host, Log: env.Log})
	if err != nil {
		t.Fatal(err)
	}
	env.StartWorker(testenv.WorkerConfig{
		Host:    host,
		Extra:   map[api.BackendTag]backends.Hypervisor{api.BackendPropolis: b},
		Default: api.BackendPropolis,
	})
}

func propolisSpec() *api.VmSpec {
	return &api.VmSpec{
		ImagePath: "/var/lib/vmherd/images/base.raw", Vcpus: 2, MemoryMB: 512,
		Network:   &api.NetworkConfig{Type: api.NetworkVnic, Name: "vnic0"},
		CloudInit: &api.CloudInitConfig{UserData: "#cloud-config\nhostname: web1\n"},
	}
}

func checkStreams(t *testing.T, env *testenv.Env) {
	t.Cleanup(func() {
		if !t.Failed() {
			t.Logf("streams: %s", env.CheckStreams())
		}
	})
}

func puts(f *fake.Server) []string {
	var out []string
	for _, r := range f.Requests() {
		if r.Method == http.MethodPut {
			b := string(r.Body)
			if r.Path == "/instance" {
				b = "ensure"
			}
			out = append(out, r.Path+" "+b)
		}
	}
	return out
}

// A VM on a worker whose default backend is propolis, through the engine,
// the worker and NATS: every lifecycle step, the console, and suspend
// refused by the engine from the backend's published capabilities.
func TestPropolisLifecycle(t *testing.T) {
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	srv := fake.Start(t, fake.Options{})
	t.Cleanup(func() { srv.CheckRequests(t) }) // every request matched the OpenAPI document
	propolisWorker(t, env, "h1", srv.Addr())
	env.WaitHost(eng, "h1")
	checkStreams(t, env)

	do := func(action, id string, cmd api.Command, want api.EventType) *api.Event {
		t.Helper()
		env.SendCmd("web1", action, id, cmd)
		ev := env.Result("web1", id, wait)
		if ev.Type != want {
			t.Fatalf("%s: %s (%s%s), want %s", action, ev.Type, ev.Reason, ev.Error, want)
		}
		return ev
	}
	recordIs := func(st api.VmState) {
		t.Helper()
		env.WaitFor("record "+string(st), wait, func() bool {
			r := record(t, env, "web1")
			return r != nil && r.State == st
		})
	}

	// create: the spec names no backend; the host's default is propolis.
	ev := do("prepare", "p1", api.Command{Spec: propolisSpec()}, api.TypePrepared)
	if h := ev.Handle; h == nil || h.Backend != api.BackendPropolis {
		t.Fatalf("prepared handle %+v", ev.Handle)
	}
	if d, err := propolis.DataOf(*ev.Handle); err != nil || d.Endpoint != srv.Addr() || d.InstanceID == "" {
		t.Fatalf("prepared handle %+v", ev.Handle)
	}
	if _, _, ok := srv.Instance(); ok {
		t.Fatal("prepare created an instance on the server")
	}

	// start: ensure (201) and Run.
	do("start", "s1", api.Command{}, api.TypeStarted)
	recordIs(api.StateRunning)
	if props, st, _ := srv.Instance(); st != papi.StateRunning || props.Name != "web1" {
		t.Fatalf("server instance %+v %s", props, st)
	}

	// stop: Stop, then the instance runs down to Destroyed.
	do("stop", "t1", api.Command{TimeoutS: 10}, api.TypeStopped)
	recordIs(api.StateStopped)
	if _, st, _ := srv.Instance(); st != papi.StateDestroyed {
		t.Fatalf("after stop the instance is %s, want Destroyed", st)
	}

	// start again: a second ensure.
	do("start", "s2", api.Command{}, api.TypeStarted)
	recordIs(api.StateRunning)
	if n := len(srv.Ensures()); n != 2 {
		t.Fatalf("%d ensures, want 2", n)
	}

	// console: the endpoint the worker reports, and the console attached
	// as vmctl does, through the worker's relay.
	ep := consoleEndpoint(t, env, "h1", "web1")
	if ep.Kind != api.ConsoleWebSocket || !strings.HasPrefix(ep.URL, "ws://"+srv.Addr()+"/instance/serial") || ep.Headers[papi.VersionHeader] != papi.Version {
		t.Fatalf("console endpoint %+v", ep)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	conn, err := relay.AttachConsole(ctx, env.NC, env.Names, "h1", "web1")
	if err != nil {
		t.Fatal(err)
	}
	out := &syncbuf.Buffer{}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		_, _ = io.Copy(out, conn)
	}()
	env.WaitFor("console attached", wait, func() bool { return srv.SerialClients() == 1 })
	if err := srv.SendControl(`{"notice":"a control message, not console output"}`); err != nil {
		t.Fatal(err)
	}
	if err := srv.WriteSerial([]byte("\r\nweb1 login: ")); err != nil {
		t.Fatal(err)
	}
	env.WaitFor("console output", wait, func() bool { return strings.Contains(out.String(), "web1 login: ") })
	if strings.Contains(out.String(), "notice") {
		t.Fatalf("a control frame reached the console output: %q", out.String())
	}
	if _, err := conn.Write([]byte("root\r")); err != nil {
		t.Fatal(err)
	}
	env.WaitFor("keystrokes at the guest", wait, func() bool { return bytes.Contains(srv.SerialInput(), []byte("root\r")) })
	if err := conn.Close(); err != nil {
		t.Fatal(err)
	}
	<-copied

	// vmctl log reads the server's console history.
	var logOut, logErr bytes.Buffer
	if code := vmctl.Main([]string{"--server", env.URL, "log", "web1"}, &logOut, &logErr); code != 0 || !strings.Contains(logOut.String(), "web1 login: ") {
		t.Fatalf("vmctl log: exit %d, out %q, err %q", code, logOut.String(), logErr.String())
	}

	// No live counters: vmctl info says why, exit 1.
	logOut.Reset()
	logErr.Reset()
	if code := vmctl.Main([]string{"--server", env.URL, "info", "web1"}, &logOut, &logErr); code != vmctl.ExitFailed ||
		!strings.Contains(logErr.String(), "the propolis backend has none: propolis-server's instance API reports no CPU, memory, disk or network counters") {
		t.Fatalf("vmctl info of a Propolis VM: exit %d, out %q, err %q; want exit 1 naming why", code, logOut.String(), logErr.String())
	}

	// suspend: rejected by the engine from the published capabilities; the
	// worker, and so the server, never sees it.
	before := len(srv.Requests())
	env.SendCmd("web1", "suspend", "sus1", api.Command{})
	dec := env.Decision("web1", "sus1", wait)
	if dec.Type != api.TypeRejected || !strings.Contains(dec.Reason, "cannot suspend") {
		t.Fatalf("suspend: %s %q, want rejected: cannot suspend", dec.Type, dec.Reason)
	}
	// destroy, which also orders after anything the suspend could have caused.
	do("destroy", "d1", api.Command{}, api.TypeDestroyed)
	for _, r := range srv.Requests()[before:] {
		if r.Method == http.MethodPut && !strings.Contains(string(r.Body), "Stop") {
			t.Fatalf("the server got %s after the suspend", r)
		}
	}
	for _, s := range env.Events("web1") {
		if s.Event.CommandID == "sus1" && s.Event.Type != api.TypeRejected {
			t.Fatalf("suspend reached %s", s.Event.Type)
		}
	}
	if _, st, _ := srv.Instance(); st != papi.StateDestroyed {
		t.Fatalf("after destroy the instance is %s", st)
	}
	want := []string{"/instance ensure", `/instance/state "Run"`, `/instance/state "Stop"`, "/instance ensure", `/instance/state "Run"`, `/instance/state "Stop"`}
	if got := puts(srv); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("state-changing requests:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	env.CheckProjection(wait)
}

// Failures of the server reach the failed event with the server's words.
func TestPropolisFailures(t *testing.T) {
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	checkStreams(t, env)

	deadAddr := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}()
	cases := []struct {
		host  string
		opts  *fake.Options // nil: nothing listens
		fault *fake.Fault   // injected before start
		fails string        // the failing action
		want  []string
	}{
		{host: "unreachable", fails: "prepare", want: []string{"propolis-server is unreachable", deadAddr, "connection refused"}},
		{host: "oldserver", opts: &fake.Options{Version: "4.0.0"}, fails: "prepare",
			want: []string{"400 Bad Request", "server does not support this API version: 5.0.0"}},
		{host: "conflict", opts: &fake.Options{}, fails: "start",
			fault: &fake.Fault{Method: "PUT", Path: "/instance", Status: 409, Code: "AlreadyInitialized", Message: "instance already initialized"},
			want:  []string{"409 Conflict", "AlreadyInitialized", "instance already initialized"}},
		{host: "broken", opts: &fake.Options{}, fails: "start",
			fault: &fake.Fault{Method: "PUT", Path: "/instance", Status: 500, Message: "VM initialization failed: failed to open /dev/zvol/rdsk/rpool/vmherd/web1"},
			want:  []string{"500 Internal Server Error", "VM initialization failed: failed to open /dev/zvol/rdsk/rpool/vmherd/web1"}},
		{host: "dies", opts: &fake.Options{}, fails: "start",
			fault: &fake.Fault{Method: "PUT", Path: "/instance/state", Body: `"Run"`, Die: true},
			want:  []string{"to be Running"}},
	}
	servers := map[string]*fake.Server{}
	for _, c := range cases {
		addr := deadAddr
		if c.opts != nil {
			srv := fake.Start(t, *c.opts)
			t.Cleanup(func() { srv.CheckRequests(t) })
			servers[c.host] = srv
			addr = srv.Addr()
		}
		propolisWorker(t, env, c.host, addr)
	}
	for _, c := range cases {
		env.WaitHost(eng, c.host)
	}
	// One after another in this test (testenv's helpers fail the test they
	// were made with), each VM on its own host and server.
	for _, c := range cases {
		func() {
			name := "vm-" + c.host
			srv := servers[c.host]
			want := append([]string{c.fails + " vm " + name}, c.want...)
			if srv != nil {
				want = append(want, srv.Addr())
			}
			// Command ids double as Nats-Msg-Id: unique across VMs.
			id := func(a string) string { return a + "-" + c.host }
			env.SendCmd(name, "prepare", id("p"), api.Command{Spec: propolisSpec(), Host: c.host})
			ev := env.Result(name, id("p"), wait)
			if c.fails == "start" {
				if ev.Type != api.TypePrepared {
					t.Fatalf("%s: prepare: %s %s", c.host, ev.Type, ev.Error)
				}
				srv.Inject(*c.fault)
				env.SendCmd(name, "start", id("s"), api.Command{})
				ev = env.Result(name, id("s"), wait)
			}
			if ev.Type != api.TypeFailed {
				t.Fatalf("%s: %s: %s, want failed", c.host, c.fails, ev.Type)
			}
			for _, w := range want {
				if !strings.Contains(ev.Error, w) {
					t.Errorf("%s: failed event %q does not carry %q", c.host, ev.Error, w)
				}
			}
			if c.fails != "start" {
				return
			}
			// The VM can be destroyed afterwards, even on a dead server.
			env.SendCmd(name, "destroy", id("d"), api.Command{})
			if ev := env.Result(name, id("d"), wait); ev.Type != api.TypeDestroyed {
				t.Fatalf("%s: destroy after the failure: %s %s", c.host, ev.Type, ev.Error)
			}
		}()
	}
}

// consoleEndpoint asks the VM's worker over NATS, as vmctl does.
func consoleEndpoint(t *testing.T, env *testenv.Env, host, name string) api.ConsoleEndpoint {
	t.Helper()
	req, _ := json.Marshal(api.QueryRequest{VM: name})
	m, err := env.NC.Request(env.Names.Query(host)+".console_endpoint", req, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if code := m.Header.Get("Nats-Service-Error-Code"); code != "" {
		t.Fatalf("console_endpoint: %s %s", code, m.Header.Get("Nats-Service-Error"))
	}
	var ep api.ConsoleEndpoint
	if err := json.Unmarshal(m.Data, &ep); err != nil {
		t.Fatal(err)
	}
	return ep
}

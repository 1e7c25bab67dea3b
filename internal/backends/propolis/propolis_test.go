package propolis_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/conformance"
	"github.com/vmherd/vmherd/internal/backends/propolis"
	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
	"github.com/vmherd/vmherd/internal/backends/propolis/fake"
)

// servers starts n fake propolis-servers and checks, when the test ends,
// that every request they got matched the OpenAPI document.
func servers(t *testing.T, n int, opts fake.Options) ([]*fake.Server, []string) {
	t.Helper()
	var fs []*fake.Server
	var addrs []string
	for i := 0; i < n; i++ {
		f := fake.Start(t, opts)
		fs = append(fs, f)
		addrs = append(addrs, f.Addr())
	}
	t.Cleanup(func() {
		for _, f := range fs {
			f.CheckRequests(t)
		}
	})
	return fs, addrs
}

func newBackend(t *testing.T, addrs ...string) *propolis.Backend {
	t.Helper()
	b, err := propolis.New(propolis.Options{Servers: addrs, Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func spec(name string) api.VmSpec {
	return api.VmSpec{
		Name: name, Backend: api.BackendPropolis, ImagePath: "/var/lib/vmherd/images/base.raw",
		Vcpus: 2, MemoryMB: 512,
		Network:   &api.NetworkConfig{Type: api.NetworkVnic, Name: "vnic0"},
		CloudInit: &api.CloudInitConfig{UserData: "#cloud-config\nhostname: " + name + "\n"},
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// The shared Hypervisor suite, against a pool of fake servers (one VM each).
func TestConformance(t *testing.T) {
	_, addrs := servers(t, 8, fake.Options{})
	conformance.Run(t, conformance.Config{
		New:         func(t *testing.T) backends.Hypervisor { return newBackend(t, addrs...) },
		Spec:        func(t *testing.T, name string) api.VmSpec { return spec(name) },
		NoSuspend:   true,
		NoStats:     true,
		ConsoleKind: api.ConsoleWebSocket,
		StopTimeout: 5 * time.Second,
		CallTimeout: 20 * time.Second,
	})
}

// The calls a lifecycle makes, in order: ensure then Run to start, Stop
// then a wait for Destroyed, a second ensure to start again.
func TestLifecycleRequests(t *testing.T) {
	fs, addrs := servers(t, 1, fake.Options{})
	f := fs[0]
	b := newBackend(t, addrs...)
	ctx := ctxT(t)
	h, err := b.Prepare(ctx, spec("web1"))
	if err != nil {
		t.Fatal(err)
	}
	if propolisData(h).Endpoint != f.Addr() || propolisData(h).InstanceID == "" || h.ID != propolisData(h).InstanceID {
		t.Fatalf("handle %+v", h)
	}
	if _, _, ok := f.Instance(); ok {
		t.Fatal("prepare created an instance; it must wait for start")
	}
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	props, st, _ := f.Instance()
	if st != papi.StateRunning || props.ID != propolisData(h).InstanceID || props.Name != "web1" {
		t.Fatalf("after start the server has %+v in %s", props, st)
	}
	if h, err = b.Stop(ctx, h, time.Second); err != nil {
		t.Fatal(err)
	}
	if _, st, _ := f.Instance(); st != papi.StateDestroyed {
		t.Fatalf("after stop the instance is %s, want Destroyed", st)
	}
	if got, _ := b.State(ctx, h); got != api.StateStopped {
		t.Fatalf("State after stop = %s", got)
	}
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	if n := len(f.Ensures()); n != 2 {
		t.Fatalf("%d ensures, want 2 (start after stop makes a new instance)", n)
	}
	var puts []string
	for _, r := range f.Requests() {
		if r.Method == http.MethodPut {
			puts = append(puts, r.Path+" "+strings.TrimSpace(string(r.Body[:min(len(r.Body), 8)])))
		}
	}
	want := []string{`/instance {"proper`, `/instance/state "Run"`, `/instance/state "Stop"`, `/instance {"proper`, `/instance/state "Run"`}
	if strings.Join(puts, "|") != strings.Join(want, "|") {
		t.Fatalf("PUTs:\n%s\nwant\n%s", strings.Join(puts, "\n"), strings.Join(want, "\n"))
	}
	if err := b.Destroy(ctx, h); err != nil {
		t.Fatal(err)
	}
	if _, st, _ := f.Instance(); st != papi.StateDestroyed {
		t.Fatalf("after destroy the instance is %s", st)
	}
	// The server is free for the next VM.
	h2, err := b.Prepare(ctx, spec("web2"))
	if err != nil || propolisData(h2).Endpoint != f.Addr() {
		t.Fatalf("prepare after destroy: %+v, %v", h2, err)
	}
}

func TestSuspendUnsupported(t *testing.T) {
	fs, addrs := servers(t, 1, fake.Options{})
	b := newBackend(t, addrs...)
	ctx := ctxT(t)
	h, err := b.Prepare(ctx, spec("s1"))
	if err != nil {
		t.Fatal(err)
	}
	if h, err = b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
	n := len(fs[0].Requests())
	_, err = b.Suspend(ctx, h)
	if !errors.Is(err, backends.ErrUnsupported) || !strings.Contains(err.Error(), "cannot pause") {
		t.Fatalf("Suspend = %v", err)
	}
	if _, err := b.Resume(ctx, h); !errors.Is(err, backends.ErrUnsupported) {
		t.Fatalf("Resume = %v", err)
	}
	if got := len(fs[0].Requests()); got != n {
		t.Fatalf("suspend/resume sent %d requests", got-n)
	}
	if c := b.Capabilities(); c.Suspend || c.Resume {
		t.Fatalf("capabilities %+v", c)
	}
}

// Failures reach the caller with the server's words.
func TestFailures(t *testing.T) {
	ctx := ctxT(t)
	dead := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		a := l.Addr().String()
		l.Close()
		return a
	}()
	cases := []struct {
		name  string
		opts  fake.Options
		fault *fake.Fault
		// failing call: "prepare" or "start"
		call string
		want []string
	}{
		{name: "unreachable", call: "prepare", want: []string{"unreachable", dead, "connection refused"}},
		{name: "old server", opts: fake.Options{Version: "4.0.0"}, call: "prepare",
			want: []string{"400", "server does not support this API version: 5.0.0"}},
		{name: "409", call: "start", fault: &fake.Fault{Method: "PUT", Path: "/instance", Status: 409, Code: "AlreadyInitialized", Message: "instance already initialized"},
			want: []string{"409", "AlreadyInitialized", "instance already initialized"}},
		{name: "500", call: "start", fault: &fake.Fault{Method: "PUT", Path: "/instance", Status: 500, Message: "VM initialization failed: cannot open /dev/zvol/rdsk/rpool/vmherd/f: No such file or directory"},
			want: []string{"500", "VM initialization failed: cannot open /dev/zvol/rdsk/rpool/vmherd/f"}},
		{name: "dies", call: "start", fault: &fake.Fault{Method: "PUT", Path: "/instance/state", Body: `"Run"`, Die: true},
			want: []string{"to be Running"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			addr := dead
			var f *fake.Server
			if c.name != "unreachable" {
				fs, _ := servers(t, 1, c.opts)
				f = fs[0]
				addr = f.Addr()
			}
			b := newBackend(t, addr)
			c.want = append(c.want, addr)
			h, err := b.Prepare(ctx, spec("f1"))
			if c.call == "start" {
				if err != nil {
					t.Fatal(err)
				}
				f.Inject(*c.fault)
				_, err = b.Start(ctx, h)
			}
			if err == nil {
				t.Fatalf("%s succeeded", c.call)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if c.call == "start" {
				// The VM can still be destroyed, even on a dead server:
				// once it is dead (a server that dies does so a moment
				// after its last answer, and a request in that moment
				// meets a closing connection, not a dead server).
				if c.fault.Die {
					for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
						conn, err := net.DialTimeout("tcp", addr, time.Second)
						if err != nil {
							break
						}
						conn.Close()
						if time.Now().After(deadline) {
							t.Fatalf("the server at %s still accepts connections after it died", addr)
						}
					}
				}
				if err := b.Destroy(ctx, h); err != nil {
					t.Fatalf("destroy after a failed start: %v", err)
				}
			}
		})
	}
}

func TestUserDataTooLarge(t *testing.T) {
	fs, addrs := servers(t, 1, fake.Options{})
	b := newBackend(t, addrs...)
	s := spec("big")
	s.CloudInit.UserData = "#cloud-config\n" + strings.Repeat("# padding\n", 90_000)
	_, err := b.Prepare(ctxT(t), s)
	if !errors.Is(err, api.ErrInvalid) || !strings.Contains(err.Error(), "1048576") || !strings.Contains(err.Error(), "user_data") {
		t.Fatalf("Prepare = %v, want a clear size error", err)
	}
	if n := len(fs[0].Requests()); n != 0 {
		t.Fatalf("the server got %d requests for a spec that cannot fit", n)
	}
	s = spec("wide")
	s.Vcpus = 256
	if _, err := b.Prepare(ctxT(t), s); !errors.Is(err, api.ErrInvalid) || !strings.Contains(err.Error(), "255") {
		t.Fatalf("Prepare with 256 vCPUs = %v", err)
	}
}

// A guest that powers off is seen as stopped, and can start again.
func TestGuestHalt(t *testing.T) {
	fs, addrs := servers(t, 1, fake.Options{})
	b := newBackend(t, addrs...)
	ctx := ctxT(t)
	h, _ := b.Prepare(ctx, spec("g1"))
	h, err := b.Start(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	fs[0].GuestHalt()
	if err := fs[0].WaitState(ctx, papi.StateDestroyed); err != nil {
		t.Fatal(err)
	}
	if st, err := b.State(ctx, h); err != nil || st != api.StateStopped {
		t.Fatalf("State after guest halt = %s, %v", st, err)
	}
	if _, err := b.Start(ctx, h); err != nil {
		t.Fatal(err)
	}
}

// A new backend (a restarted worker) adopts a running VM from its handle.
func TestAdopt(t *testing.T) {
	_, addrs := servers(t, 2, fake.Options{})
	ctx := ctxT(t)
	b1 := newBackend(t, addrs...)
	h, _ := b1.Prepare(ctx, spec("a1"))
	h, err := b1.Start(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	b2 := newBackend(t, addrs...)
	h2, st, err := b2.Adopt(ctx, h, api.StateRunning)
	if err != nil || st != api.StateRunning || h2.ID != h.ID {
		t.Fatalf("Adopt = %+v %s %v", h2, st, err)
	}
	// The adopted VM keeps its server: a new VM gets the other one.
	o, err := b2.Prepare(ctx, spec("a2"))
	if err != nil || propolisData(o).Endpoint == propolisData(h).Endpoint {
		t.Fatalf("second VM %+v, %v", o, err)
	}
	if _, err := b2.Stop(ctx, h2, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := b2.Destroy(ctx, h2); err != nil {
		t.Fatal(err)
	}
}

func TestConsoleEndpoint(t *testing.T) {
	_, addrs := servers(t, 1, fake.Options{})
	b := newBackend(t, addrs...)
	h, _ := b.Prepare(ctxT(t), spec("c1"))
	ep, err := b.ConsoleEndpoint(h)
	if err != nil {
		t.Fatal(err)
	}
	if ep.Kind != api.ConsoleWebSocket || ep.URL != "ws://"+addrs[0]+"/instance/serial" || ep.Headers["api-version"] != "5.0.0" {
		t.Fatalf("endpoint %+v", ep)
	}
}

func TestNetworkRules(t *testing.T) {
	_, addrs := servers(t, 1, fake.Options{})
	b := newBackend(t, addrs...)
	for _, n := range []*api.NetworkConfig{{Type: api.NetworkUser}, {Type: api.NetworkTap, Bridge: "br0"}, {Type: api.NetworkVnic}} {
		s := spec("n1")
		s.Network = n
		if _, err := b.Prepare(ctxT(t), s); !errors.Is(err, api.ErrInvalid) {
			t.Errorf("network %+v: Prepare = %v, want ErrInvalid", n, err)
		}
	}
	s := spec("n2")
	s.Network = &api.NetworkConfig{Type: api.NetworkNone}
	if _, err := b.Prepare(ctxT(t), s); err != nil {
		t.Fatalf("no network: %v", err)
	}
}

func TestNewOptions(t *testing.T) {
	if _, err := propolis.New(propolis.Options{}); err == nil {
		t.Fatal("New without servers or provisioner succeeded")
	}
	if _, err := propolis.NewHostProvisioner(propolis.HostOptions{}); err == nil {
		t.Fatal("NewHostProvisioner without options succeeded")
	}
}

// propolisData reads the backend's data of h.
func propolisData(h api.VmHandle) propolis.HandleData {
	d, err := propolis.DataOf(h)
	if err != nil {
		panic(err)
	}
	return d
}

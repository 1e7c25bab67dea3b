package fake_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"

	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
	"github.com/vmherd/vmherd/internal/backends/propolis/fake"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func ensureReq(cpus int) papi.EnsureRequest {
	id := uuid.New()
	return papi.EnsureRequest{
		Properties: papi.InstanceProperties{
			ID: id.String(), Name: "t1", Description: "test",
			Metadata: papi.InstanceMetadata{ProjectID: uuid.NewString(), SiloID: uuid.NewString(), SledID: uuid.NewString(), SledModel: "m", SledSerial: "s"},
		},
		Init: papi.NewSpecInit(papi.InstanceSpec{
			Board: papi.Board{Cpus: cpus, MemoryMB: 256, Chipset: papi.Chipset{Type: papi.ChipsetI440Fx}},
			Components: map[string]papi.Component{
				"com1":    papi.NewComponent(papi.TypeSerialPort, papi.SerialPort{Num: "com1"}),
				"disk":    papi.NewComponent(papi.TypeVirtioDisk, papi.VirtioDisk{BackendID: "disk-be", PCIPath: papi.PCIPath{Device: 4}}),
				"disk-be": papi.NewComponent(papi.TypeFileStorageBackend, papi.FileStorageBackend{Path: "/dev/zvol/rdsk/p/t1", BlockSize: 512}),
				"boot":    papi.NewComponent(papi.TypeBootSettings, papi.BootSettings{Order: []papi.BootOrderEntry{{ID: "disk"}}}),
			},
		}),
	}
}

func raw(t *testing.T, method, url, version string, body string) (int, papi.Error) {
	t.Helper()
	req, _ := http.NewRequest(method, url, strings.NewReader(body))
	if version != "" {
		req.Header.Set(papi.VersionHeader, version)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e papi.Error
	b, _ := io.ReadAll(resp.Body)
	_ = json.Unmarshal(b, &e)
	return resp.StatusCode, e
}

func TestDocumentFound(t *testing.T) {
	f := fake.Start(t, fake.Options{})
	if !f.Validating() {
		t.Skipf("the OpenAPI document is not at %s; validation is off", fake.SpecPath())
	}
}

func TestVersionHeader(t *testing.T) {
	f := fake.Start(t, fake.Options{})
	u := "http://" + f.Addr() + "/instance"
	for _, c := range []struct {
		version string
		status  int
		msg     string
	}{
		{"", 400, `missing expected header "api-version"`},
		{"five", 400, "bad value"},
		{"6.0.0", 400, "server does not support this API version: 6.0.0"},
		{"5.0.0", 424, "Server not initialized"},
		{"4.1.0", 424, "Server not initialized"},
	} {
		st, e := raw(t, http.MethodGet, u, c.version, "")
		if st != c.status || !strings.Contains(e.Message, c.msg) || e.RequestID == "" {
			t.Errorf("api-version %q: %d %+v, want %d %q", c.version, st, e, c.status, c.msg)
		}
	}
	// The WebSocket upgrade needs the header too.
	if _, resp, err := websocket.Dial(ctxT(t), "ws://"+f.Addr()+"/instance/serial", nil); err == nil || resp == nil || resp.StatusCode != 400 {
		t.Fatalf("serial console without api-version: %v", err)
	}
	old := fake.Start(t, fake.Options{Version: "4.0.0"})
	if st, e := raw(t, http.MethodGet, "http://"+old.Addr()+"/instance", papi.Version, ""); st != 400 || !strings.Contains(e.Message, "5.0.0") {
		t.Errorf("old server: %d %+v", st, e)
	}
}

func TestInstanceLifecycle(t *testing.T) {
	f := fake.Start(t, fake.Options{})
	c := papi.New(f.Addr())
	ctx := ctxT(t)
	if _, err := c.Get(ctx); !errors.Is(err, papi.ErrNoInstance) || papi.StatusOf(err) != 424 {
		t.Fatalf("Get before ensure = %v", err)
	}
	if _, err := c.StateMonitor(ctx, 0); papi.StatusOf(err) != 424 {
		t.Fatalf("state-monitor before ensure = %v", err)
	}
	if err := c.PutState(ctx, papi.RequestRun); papi.StatusOf(err) != 424 {
		t.Fatalf("Run before ensure = %v", err)
	}
	req := ensureReq(2)
	if err := c.Ensure(ctx, req); err != nil {
		t.Fatal(err)
	}
	inst, err := c.Get(ctx)
	if err != nil || inst.State != papi.StateCreating || inst.Properties.ID != req.Properties.ID {
		t.Fatalf("after ensure: %+v %v", inst, err)
	}
	if err := c.Ensure(ctx, ensureReq(2)); !errors.Is(err, papi.ErrAlreadyInitialized) || papi.StatusOf(err) != 409 {
		t.Fatalf("second ensure = %v", err)
	}
	m, err := c.StateMonitor(ctx, 0)
	if err != nil || m.Gen != 1 || m.State != papi.StateCreating {
		t.Fatalf("monitor gen 0 = %+v %v", m, err)
	}
	if err := c.PutState(ctx, papi.RequestReboot); papi.StatusOf(err) != 403 {
		t.Fatalf("Reboot before Run = %v", err)
	}
	if err := c.PutState(ctx, papi.RequestRun); err != nil {
		t.Fatal(err)
	}
	// Generations grow with each state: Starting (2), Running (3).
	m, err = c.StateMonitor(ctx, 3)
	if err != nil || m.Gen != 3 || m.State != papi.StateRunning {
		t.Fatalf("monitor gen 3 = %+v %v", m, err)
	}
	if err := c.PutState(ctx, papi.RequestRun); err != nil {
		t.Fatalf("Run while running (ignored) = %v", err)
	}
	if err := c.PutState(ctx, papi.RequestStop); err != nil {
		t.Fatal(err)
	}
	err = c.PutState(ctx, papi.RequestRun)
	var ae *papi.APIError
	if papi.StatusOf(err) != 403 && papi.StatusOf(err) != 424 {
		t.Fatalf("Run while halting = %v", err)
	}
	if errors.As(err, &ae) && ae.Status == 403 && !strings.Contains(ae.Body.ErrorCode, "instance state change not allowed") {
		t.Fatalf("403 body %+v", ae.Body)
	}
	if _, err := c.WaitFor(ctx, papi.StateDestroyed); err != nil {
		t.Fatal(err)
	}
	// Destroyed is final: a later generation is never reached.
	m, _ = c.StateMonitor(ctx, 0)
	if _, err := c.StateMonitor(ctx, m.Gen+1); papi.StatusOf(err) != http.StatusGone {
		t.Fatalf("monitor past the final generation = %v", err)
	}
	if err := c.PutState(ctx, papi.RequestStop); papi.StatusOf(err) != 424 {
		t.Fatalf("Stop after rundown = %v", err)
	}
	// A destroyed instance can be replaced; its generations start again.
	if err := c.Ensure(ctx, ensureReq(1)); err != nil {
		t.Fatalf("ensure after rundown: %v", err)
	}
	if m, err := c.StateMonitor(ctx, 0); err != nil || m.Gen != 1 {
		t.Fatalf("new instance monitor = %+v %v", m, err)
	}
	if n := len(f.Ensures()); n != 2 {
		t.Fatalf("%d ensures recorded", n)
	}
	f.CheckRequests(t)
}

// A long poll waiting on an instance that is replaced ends with 410.
func TestMonitorGone(t *testing.T) {
	f := fake.Start(t, fake.Options{Step: 20 * time.Millisecond})
	c := papi.New(f.Addr())
	ctx := ctxT(t)
	if err := c.Ensure(ctx, ensureReq(1)); err != nil {
		t.Fatal(err)
	}
	if err := c.PutState(ctx, papi.RequestStop); err != nil {
		t.Fatal(err)
	}
	if _, err := c.StateMonitor(ctx, 100); papi.StatusOf(err) != http.StatusGone {
		t.Fatalf("monitor = %v, want 410 once the instance ran down", err)
	}
	f.CheckRequests(t)
}

func TestValidation(t *testing.T) {
	f := fake.Start(t, fake.Options{})
	if !f.Validating() {
		t.Skip("no OpenAPI document")
	}
	c := papi.New(f.Addr())
	ctx := ctxT(t)
	// 300 vCPUs do not fit the board's uint8; the spec check refuses it too.
	if err := c.Ensure(ctx, ensureReq(300)); papi.StatusOf(err) != 400 {
		t.Fatalf("ensure with 300 cpus = %v", err)
	}
	// state-monitor without its body.
	if st, _ := raw(t, http.MethodGet, "http://"+f.Addr()+"/instance/state-monitor", papi.Version, ""); st == 200 {
		t.Fatal("state-monitor without a body answered 200")
	}
	reqs := f.Requests()
	if len(reqs) != 2 || reqs[0].Invalid == "" || !strings.Contains(reqs[0].Invalid, "cpus") || reqs[1].Invalid == "" {
		t.Fatalf("requests not flagged invalid: %+v", reqs)
	}
	// A body over 1 MiB is refused.
	big := strings.Repeat("x", papi.MaxRequestBody+1)
	if st, e := raw(t, http.MethodPut, "http://"+f.Addr()+"/instance", papi.Version, `"`+big+`"`); st != 400 || !strings.Contains(e.Message, "maximum size") {
		t.Fatalf("big body: %d %+v", st, e)
	}
}

func TestSpecChecks(t *testing.T) {
	good := ensureReq(2)
	var si papi.SpecInit
	_ = json.Unmarshal(good.Init.Value, &si)
	if err := fake.CheckSpec(si.Spec); err != nil {
		t.Fatal(err)
	}
	bad := func(mut func(c map[string]papi.Component)) error {
		s := papi.InstanceSpec{Board: si.Spec.Board, Components: map[string]papi.Component{}}
		for k, v := range si.Spec.Components {
			s.Components[k] = v
		}
		mut(s.Components)
		return fake.CheckSpec(s)
	}
	cases := map[string]func(c map[string]papi.Component){
		"duplicate pci": func(c map[string]papi.Component) {
			c["disk2"] = papi.NewComponent(papi.TypeVirtioDisk, papi.VirtioDisk{BackendID: "be2", PCIPath: papi.PCIPath{Device: 4}})
			c["be2"] = papi.NewComponent(papi.TypeFileStorageBackend, papi.FileStorageBackend{Path: "/x", BlockSize: 512})
		},
		"reserved pci": func(c map[string]papi.Component) {
			c["disk"] = papi.NewComponent(papi.TypeVirtioDisk, papi.VirtioDisk{BackendID: "disk-be", PCIPath: papi.PCIPath{Device: 1}})
		},
		"missing backend": func(c map[string]papi.Component) { delete(c, "disk-be") },
		"boot non-disk": func(c map[string]papi.Component) {
			c["boot"] = papi.NewComponent(papi.TypeBootSettings, papi.BootSettings{Order: []papi.BootOrderEntry{{ID: "com1"}}})
		},
		"wrong backend kind": func(c map[string]papi.Component) {
			c["disk-be"] = papi.NewComponent(papi.TypeVirtioNetworkBackend, papi.VirtioNetworkBackend{VnicName: "v0"})
		},
	}
	for name, mut := range cases {
		if err := bad(mut); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestFaults(t *testing.T) {
	f := fake.Start(t, fake.Options{})
	c := papi.New(f.Addr())
	ctx := ctxT(t)
	f.Inject(fake.Fault{Method: "GET", Path: "/instance", Status: 500, Message: "boom"})
	_, err := c.Get(ctx)
	var ae *papi.APIError
	if !errors.As(err, &ae) || ae.Status != 500 || ae.Body.Message != "boom" || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("fault = %v", err)
	}
	if _, err := c.Get(ctx); !errors.Is(err, papi.ErrNoInstance) {
		t.Fatalf("fault applied twice: %v", err)
	}
	// 503s are retried by GETs.
	f.Inject(fake.Fault{Method: "GET", Path: "/instance", Status: 503, Message: "busy", Times: 2})
	if _, err := c.Get(ctx); !errors.Is(err, papi.ErrNoInstance) {
		t.Fatalf("GET after two 503s = %v", err)
	}
	f.Inject(fake.Fault{Method: "GET", Path: "/instance", Die: true})
	_, _ = c.Get(ctx)
	deadline := time.Now().Add(5 * time.Second)
	for !f.Dead() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := c.Get(ctx); !errors.Is(err, papi.ErrUnreachable) {
		t.Fatalf("Get from a dead server = %v", err)
	}
}

func TestSerial(t *testing.T) {
	f := fake.Start(t, fake.Options{Echo: true})
	c := papi.New(f.Addr())
	ctx := ctxT(t)
	if err := c.Ensure(ctx, ensureReq(1)); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteSerial([]byte("boot\r\n")); err != nil {
		t.Fatal(err)
	}
	zero := uint64(0)
	conn, _, err := websocket.Dial(ctx, c.SerialURL(papi.HistoryQuery{FromStart: &zero}), &websocket.DialOptions{HTTPHeader: papi.Headers()})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseNow()
	// History replays first.
	if typ, b, err := conn.Read(ctx); err != nil || typ != websocket.MessageBinary || string(b) != "boot\r\n" {
		t.Fatalf("replay: %v %q %v", typ, b, err)
	}
	if err := f.SendControl(`{"note":"control"}`); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := conn.Read(ctx); err != nil || typ != websocket.MessageText {
		t.Fatalf("control frame: %v %q %v", typ, b, err)
	}
	if err := conn.Write(ctx, websocket.MessageBinary, []byte("ls\r")); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := conn.Read(ctx); err != nil || typ != websocket.MessageBinary || string(b) != "ls\r" {
		t.Fatalf("echo: %v %q %v", typ, b, err)
	}
	if got := string(f.SerialInput()); got != "ls\r" {
		t.Fatalf("input %q", got)
	}
	h, err := c.SerialHistory(ctx, papi.HistoryQuery{FromStart: &zero})
	if err != nil || string(h.Data) != "boot\r\nls\r" || h.LastByteOffset != 9 {
		t.Fatalf("history %q %d %v", h.Data, h.LastByteOffset, err)
	}
	two := uint64(2)
	if h, err := c.SerialHistory(ctx, papi.HistoryQuery{MostRecent: &two}); err != nil || string(h.Data) != "s\r" {
		t.Fatalf("most_recent history %q %v", h.Data, err)
	}
	if _, err := c.SerialHistory(ctx, papi.HistoryQuery{}); papi.StatusOf(err) != 400 {
		t.Fatalf("history without offsets = %v", err)
	}
	// The console closes when the instance runs down.
	if err := c.PutState(ctx, papi.RequestStop); err != nil {
		t.Fatal(err)
	}
	for {
		_, _, err := conn.Read(ctx)
		if err != nil {
			if websocket.CloseStatus(err) != websocket.StatusNormalClosure {
				t.Fatalf("console ended with %v", err)
			}
			break
		}
	}
	if _, err := c.SerialHistory(ctx, papi.HistoryQuery{FromStart: &zero}); !errors.Is(err, papi.ErrNoInstance) {
		t.Fatalf("history after rundown = %v", err)
	}
	f.CheckRequests(t)
	if !bytes.Contains([]byte(f.Requests()[len(f.Requests())-1].String()), []byte("serial/history")) {
		t.Fatalf("last request %s", f.Requests()[len(f.Requests())-1])
	}
}

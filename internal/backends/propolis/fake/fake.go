// Package fake is an in-process propolis-server for tests. It serves the
// subset of the real API (version 5.0.0) that vmherd uses and behaves like
// the real server there:
//
//   - every request must carry "api-version" (missing, malformed or newer
//     than the server's version: 400);
//   - PUT /instance answers 201 and leaves the instance Creating (not
//     started); a second ensure while an instance is live answers 409
//     AlreadyInitialized; after the instance is Destroyed a new ensure is
//     accepted;
//   - GET /instance, state changes, the serial console and its history
//     answer 424 NoInstance before the first ensure (and, except GET
//     /instance, once the instance has run down);
//   - PUT /instance/state "Run" goes Starting → Running, "Stop" is a hard
//     halt Stopping → Stopped → Destroyed, refused requests answer 403;
//   - GET /instance/state-monitor long-polls on a generation that starts at
//     1 for each instance, and answers 410 once the instance can never reach
//     the asked generation;
//   - GET /instance/serial is a WebSocket carrying UART bytes in binary
//     frames both ways and JSON control messages in text frames;
//     /instance/serial/history serves the buffered bytes;
//   - bodies over 1 MiB answer 400.
//
// Every request is recorded and, when the OpenAPI document is found (see
// SpecPath), checked against it; so is every JSON answer. Faults can be
// injected: error answers with a given status and message, and a server
// that dies (drops its connections and stops listening) after a request.
package fake

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"

	papi "github.com/vmherd/vmherd/internal/backends/propolis/api"
)

// Options configure a fake server.
type Options struct {
	// Version is the newest API version the server speaks (default
	// papi.Version). A request naming a newer version is refused with 400,
	// as an older real server refuses a newer client.
	Version string
	// Step is the time each automatic state transition takes (default 2ms).
	Step time.Duration
	// Echo copies serial input back to the serial output, like a guest
	// shell echoing keystrokes.
	Echo bool
	// Spec validates requests and answers; nil loads the document found at
	// SpecPath (validation is skipped when there is none).
	Spec *Spec
	// Listen is the address to listen on (default 127.0.0.1 and a free
	// port), for tests that choose the server's address, as a real
	// propolis-server is told its address on the command line.
	Listen string
}

// Request is one request the server received.
type Request struct {
	Method     string
	Path       string
	Query      string
	APIVersion string
	Body       []byte
	// Status answered (101 for an accepted WebSocket upgrade, 0 if the
	// connection was dropped).
	Status int
	// Operation is the operationId in the OpenAPI document.
	Operation string
	// Validated: the request was checked against the OpenAPI document.
	Validated bool
	// Invalid says why the request does not match the document ("" if it
	// does or was not checked).
	Invalid string
	// ResponseInvalid says why the answer does not match the document.
	ResponseInvalid string
}

func (r Request) String() string {
	s := r.Method + " " + r.Path
	if r.Query != "" {
		s += "?" + r.Query
	}
	if len(r.Body) > 0 && len(r.Body) < 80 {
		s += " " + string(r.Body)
	}
	return fmt.Sprintf("%s -> %d", s, r.Status)
}

// Fault changes how the server answers matching requests.
type Fault struct {
	// Method and Path select requests ("" matches any).
	Method string
	Path   string
	// Body, if set, must equal the request body (trimmed), e.g. `"Run"`.
	Body string
	// Status, if set, is answered instead of handling the request, with an
	// error body carrying Code and Message.
	Status  int
	Code    string
	Message string
	// Die: handle the request, answer it, then die: drop every connection
	// and stop listening, as a crashed process would.
	Die bool
	// Times is how many requests the fault applies to (0: one).
	Times int

	hits int
}

func (f *Fault) matches(r *http.Request, body []byte) bool {
	if f.Method != "" && f.Method != r.Method {
		return false
	}
	if f.Path != "" && f.Path != r.URL.Path {
		return false
	}
	if f.Body != "" && f.Body != string(bytes.TrimSpace(body)) {
		return false
	}
	return true
}

// Server is a fake propolis-server.
type Server struct {
	opts Options
	spec *Spec
	ts   *httptest.Server

	mu       sync.Mutex
	inst     *instance // nil before the first ensure
	ensures  []papi.EnsureRequest
	requests []Request
	faults   []*Fault
	input    []byte // serial input received, across instances
	dead     chan struct{}
	dieOnce  sync.Once
	timers   map[*time.Timer]struct{}
	frozen   bool // dying: no more state transitions
}

// instance is one incarnation: created by an ensure, ended by rundown.
type instance struct {
	props   papi.InstanceProperties
	spec    papi.InstanceSpec
	state   papi.InstanceState
	gen     uint64
	final   bool          // rundown complete: the state never changes again
	changed chan struct{} // closed and replaced on every change
	started bool          // Run was requested
	halting bool          // Stop was requested
	serial  []byte        // UART output since the instance was created
	clients map[*serialClient]struct{}
}

// Start starts a fake server and stops it when the test ends.
func Start(tb testing.TB, opts Options) *Server {
	tb.Helper()
	s, err := New(opts)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(s.Close)
	return s
}

// New starts a fake server.
func New(opts Options) (*Server, error) {
	if opts.Version == "" {
		opts.Version = papi.Version
	}
	if _, err := parseVersion(opts.Version); err != nil {
		return nil, fmt.Errorf("fake propolis-server: version %q: %w", opts.Version, err)
	}
	if opts.Step == 0 {
		opts.Step = 2 * time.Millisecond
	}
	spec := opts.Spec
	if spec == nil {
		var err error
		if spec, err = LoadSpec(); err != nil {
			return nil, err
		}
	}
	s := &Server{opts: opts, spec: spec, dead: make(chan struct{}), timers: map[*time.Timer]struct{}{}}
	if opts.Listen == "" {
		s.ts = httptest.NewServer(s)
		return s, nil
	}
	l, err := net.Listen("tcp", opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("fake propolis-server: %w", err)
	}
	s.ts = httptest.NewUnstartedServer(s)
	_ = s.ts.Listener.Close()
	s.ts.Listener = l
	s.ts.Start()
	return s, nil
}

// Addr is the server's host:port, as given to propolis clients.
func (s *Server) Addr() string { return s.ts.Listener.Addr().String() }

// Validating reports whether requests are checked against the OpenAPI
// document (false when the document was not found).
func (s *Server) Validating() bool { return s.spec != nil }

// Close stops the server.
func (s *Server) Close() {
	s.Kill()
	s.ts.Close()
}

// Kill makes the server die now: open connections are dropped, waiting
// requests are aborted, the address stops accepting connections.
func (s *Server) Kill() {
	s.dieOnce.Do(func() {
		s.mu.Lock()
		s.frozen = true
		s.mu.Unlock()
		close(s.dead)
		_ = s.ts.Listener.Close()
		s.ts.CloseClientConnections()
		s.mu.Lock()
		for t := range s.timers {
			t.Stop()
		}
		var clients []*serialClient
		if s.inst != nil {
			for c := range s.inst.clients {
				clients = append(clients, c)
			}
		}
		s.mu.Unlock()
		for _, c := range clients {
			_ = c.conn.CloseNow()
		}
	})
}

// Dead reports whether the server was killed.
func (s *Server) Dead() bool {
	select {
	case <-s.dead:
		return true
	default:
		return false
	}
}

// Inject adds a fault.
func (s *Server) Inject(f Fault) {
	if f.Times == 0 {
		f.Times = 1
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, &f)
}

// Requests returns every request received so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.requests...)
}

// Ensures returns the bodies of every accepted PUT /instance.
func (s *Server) Ensures() []papi.EnsureRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]papi.EnsureRequest(nil), s.ensures...)
}

// Instance returns the current instance's properties and state; ok is
// false before the first ensure.
func (s *Server) Instance() (props papi.InstanceProperties, state papi.InstanceState, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inst == nil {
		return props, "", false
	}
	return s.inst.props, s.inst.state, true
}

// CheckRequests fails the test if any request or answer did not match the
// OpenAPI document, or if a request did not carry the API version. Without
// the document (it is not part of the repository) it checks the version
// header and logs that bodies were not validated.
func (s *Server) CheckRequests(tb testing.TB) {
	tb.Helper()
	if s.spec == nil {
		tb.Logf("propolis OpenAPI document not found at %q (set %s): request bodies were not validated", SpecPath(), SpecEnv)
	}
	for _, r := range s.Requests() {
		switch {
		case s.spec == nil:
		case !r.Validated:
			tb.Errorf("fake propolis-server %s: request %s was not validated", s.Addr(), r)
		case r.Invalid != "":
			tb.Errorf("fake propolis-server %s: request %s does not match the OpenAPI document: %s", s.Addr(), r, r.Invalid)
		case r.ResponseInvalid != "":
			tb.Errorf("fake propolis-server %s: answer to %s does not match the OpenAPI document: %s", s.Addr(), r, r.ResponseInvalid)
		}
		if r.APIVersion != papi.Version {
			tb.Errorf("fake propolis-server %s: request %s carried api-version %q, want %q", s.Addr(), r, r.APIVersion, papi.Version)
		}
	}
}

// GuestHalt makes the guest power off: a running instance halts and runs
// down (Stopping → Stopped → Destroyed) without a request.
func (s *Server) GuestHalt() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.inst
	if in == nil || in.final || in.halting {
		return false
	}
	in.halting = true
	if in.state != papi.StateStarting && in.state != papi.StateRebooting {
		s.haltLocked(in)
	}
	return true
}

// ---- HTTP plumbing ----

// recorder captures the status and body of an answer while passing it on.
type recorder struct {
	http.ResponseWriter
	status   int
	body     bytes.Buffer
	hijacked bool
}

func (w *recorder) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recorder) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	w.body.Write(p)
	return w.ResponseWriter.Write(p)
}

func (w *recorder) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h, ok := w.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, errors.New("fake propolis-server: connection cannot be hijacked")
	}
	w.hijacked = true
	if w.status == 0 {
		w.status = http.StatusSwitchingProtocols
	}
	return h.Hijack()
}

func (w *recorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// ServeHTTP records, validates and dispatches one request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.Dead() {
		panic(http.ErrAbortHandler)
	}
	body, tooLarge := readBody(r)
	rec := Request{
		Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery,
		APIVersion: r.Header.Get(papi.VersionHeader), Body: body,
	}
	if s.spec != nil {
		op, err := s.spec.ValidateRequest(r.Context(), r, body)
		rec.Operation, rec.Validated = op, true
		if err != nil {
			rec.Invalid = err.Error()
		}
	}
	s.mu.Lock()
	idx := len(s.requests)
	s.requests = append(s.requests, rec)
	fault := s.faultLocked(r, body)
	s.mu.Unlock()

	rw := &recorder{ResponseWriter: w}
	defer func() {
		s.mu.Lock()
		s.requests[idx].Status = rw.status
		s.mu.Unlock()
		if s.spec != nil && !rw.hijacked && rw.status != 0 {
			if err := s.spec.ValidateResponse(r.Context(), r, rw.status, rw.Header(), rw.body.Bytes()); err != nil {
				s.mu.Lock()
				s.requests[idx].ResponseInvalid = err.Error()
				s.mu.Unlock()
			}
		}
	}()

	if err := s.checkVersion(r); err != nil {
		writeError(rw, http.StatusBadRequest, "", err.Error())
		return
	}
	if tooLarge {
		writeError(rw, http.StatusBadRequest, "", fmt.Sprintf("request body exceeded maximum size of %d bytes", papi.MaxRequestBody))
		return
	}
	if fault != nil && fault.Status != 0 {
		writeError(rw, fault.Status, fault.Code, fault.Message)
		return
	}
	s.route(rw, r, body)
	if fault != nil && fault.Die {
		// Nothing changes any more (the process is crashing); die once this
		// answer is on its way.
		s.mu.Lock()
		s.frozen = true
		for t := range s.timers {
			t.Stop()
		}
		s.mu.Unlock()
		rw.Flush()
		go func() {
			time.Sleep(5 * time.Millisecond)
			s.Kill()
		}()
	}
}

func readBody(r *http.Request) ([]byte, bool) {
	if r.Body == nil {
		return nil, false
	}
	b, _ := io.ReadAll(io.LimitReader(r.Body, papi.MaxRequestBody+1))
	if len(b) > papi.MaxRequestBody {
		return nil, true
	}
	return b, false
}

func (s *Server) faultLocked(r *http.Request, body []byte) *Fault {
	for _, f := range s.faults {
		if f.hits < f.Times && f.matches(r, body) {
			f.hits++
			return f
		}
	}
	return nil
}

func (s *Server) route(w http.ResponseWriter, r *http.Request, body []byte) {
	switch {
	case r.URL.Path == "/instance" && r.Method == http.MethodGet:
		s.getInstance(w)
	case r.URL.Path == "/instance" && r.Method == http.MethodPut:
		s.ensure(w, body)
	case r.URL.Path == "/instance/state" && r.Method == http.MethodPut:
		s.putState(w, body)
	case r.URL.Path == "/instance/state-monitor" && r.Method == http.MethodGet:
		s.stateMonitor(w, r, body)
	case r.URL.Path == "/instance/serial/history" && r.Method == http.MethodGet:
		s.serialHistory(w, r)
	case r.URL.Path == "/instance/serial" && r.Method == http.MethodGet:
		s.serial(w, r)
	default:
		writeError(w, http.StatusNotFound, "", "Not Found")
	}
}

// checkVersion enforces the api-version header.
func (s *Server) checkVersion(r *http.Request) error {
	v := r.Header.Get(papi.VersionHeader)
	if v == "" {
		return fmt.Errorf("missing expected header %q", papi.VersionHeader)
	}
	got, err := parseVersion(v)
	if err != nil {
		return fmt.Errorf("bad value for header %q: %v", papi.VersionHeader, err)
	}
	have, _ := parseVersion(s.opts.Version)
	if compareVersions(got, have) > 0 {
		return fmt.Errorf("server does not support this API version: %s", v)
	}
	return nil
}

func parseVersion(v string) ([3]int, error) {
	var out [3]int
	parts := strings.Split(v, ".")
	if len(parts) != 3 {
		return out, fmt.Errorf("%q is not a semver version (major.minor.patch)", v)
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 {
			return out, fmt.Errorf("%q is not a semver version (major.minor.patch)", v)
		}
		out[i] = n
	}
	return out, nil
}

func compareVersions(a, b [3]int) int {
	for i := range a {
		if a[i] != b[i] {
			if a[i] < b[i] {
				return -1
			}
			return 1
		}
	}
	return 0
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, papi.Error{ErrorCode: code, Message: msg, RequestID: uuid.NewString()})
}

func noInstance(w http.ResponseWriter) {
	writeError(w, http.StatusFailedDependency, papi.CodeNoInstance, "Server not initialized (no instance)")
}

// forbidden answers a refused state change the way the real server does:
// the reason in error_code, the status text as the message.
func forbidden(w http.ResponseWriter, reason string) {
	writeError(w, http.StatusForbidden, "instance state change not allowed: "+reason, "Forbidden")
}

// ---- instance lifecycle ----

func (s *Server) getInstance(w http.ResponseWriter) {
	s.mu.Lock()
	in := s.inst
	if in == nil {
		s.mu.Unlock()
		noInstance(w)
		return
	}
	resp := papi.GetResponse{Instance: papi.Instance{Properties: in.props, State: in.state}}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) ensure(w http.ResponseWriter, body []byte) {
	var req papi.EnsureRequest
	if err := json.Unmarshal(body, &req); err != nil {
		writeError(w, http.StatusBadRequest, "", "unable to parse JSON body: "+err.Error())
		return
	}
	if req.Init.Method != papi.InitMethodSpec {
		writeError(w, http.StatusBadRequest, "", fmt.Sprintf("initialization method %q is not supported by this fake", req.Init.Method))
		return
	}
	var si papi.SpecInit
	if err := json.Unmarshal(req.Init.Value, &si); err != nil {
		writeError(w, http.StatusBadRequest, "", "unable to parse JSON body: init.value: "+err.Error())
		return
	}
	if err := CheckSpec(si.Spec); err != nil {
		writeError(w, http.StatusBadRequest, "", "failed to generate instance spec from request: "+err.Error())
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inst != nil && !s.inst.final {
		writeError(w, http.StatusConflict, papi.CodeAlreadyInitialized, "instance already initialized")
		return
	}
	s.inst = &instance{
		props: req.Properties, spec: si.Spec, state: papi.StateCreating, gen: 1,
		changed: make(chan struct{}), clients: map[*serialClient]struct{}{},
	}
	s.ensures = append(s.ensures, req)
	writeJSON(w, http.StatusCreated, map[string]any{"migrate": nil})
}

// CheckSpec applies the checks the real server's spec builder makes to the
// parts of a spec vmherd uses: components refer to existing backends of the
// right kind, each backend is used once, PCI paths are valid and unique
// (device 0 and 1 on bus 0 belong to the chipset), the boot order names
// disks, the board has CPUs and memory, blobs are base64.
func CheckSpec(spec papi.InstanceSpec) error {
	if spec.Board.Cpus < 1 || spec.Board.Cpus > papi.MaxCpus {
		return fmt.Errorf("board: %d vCPUs is out of range (1..%d)", spec.Board.Cpus, papi.MaxCpus)
	}
	if spec.Board.MemoryMB == 0 {
		return errors.New("board: memory_mb must be positive")
	}
	if spec.Board.Chipset.Type != papi.ChipsetI440Fx {
		return fmt.Errorf("board: unknown chipset %q", spec.Board.Chipset.Type)
	}
	type dev struct {
		backend string
		kinds   []string
	}
	devices := map[string]dev{}
	pci := map[papi.PCIPath]string{}
	disks := map[string]bool{}
	usedBackends := map[string]string{}
	addPCI := func(name string, p papi.PCIPath) error {
		if p.Device > 31 || p.Function > 7 {
			return fmt.Errorf("component %s: PCI path %s is out of range", name, p)
		}
		if p.Bus == 0 && p.Device < 2 {
			return fmt.Errorf("component %s: PCI path %s is reserved for the chipset", name, p)
		}
		if other, ok := pci[p]; ok {
			return fmt.Errorf("components %s and %s: PCI path %s is used twice", other, name, p)
		}
		pci[p] = name
		return nil
	}
	for name, c := range spec.Components {
		switch c.Type {
		case papi.TypeVirtioDisk:
			var d papi.VirtioDisk
			if err := json.Unmarshal(c.Component, &d); err != nil {
				return fmt.Errorf("component %s: %v", name, err)
			}
			if err := addPCI(name, d.PCIPath); err != nil {
				return err
			}
			devices[name] = dev{d.BackendID, []string{papi.TypeFileStorageBackend, papi.TypeBlobStorageBackend, "crucible_storage_backend"}}
			disks[name] = true
		case papi.TypeVirtioNic:
			var n papi.VirtioNic
			if err := json.Unmarshal(c.Component, &n); err != nil {
				return fmt.Errorf("component %s: %v", name, err)
			}
			if err := addPCI(name, n.PCIPath); err != nil {
				return err
			}
			devices[name] = dev{n.BackendID, []string{papi.TypeVirtioNetworkBackend, "dlpi_network_backend"}}
		case papi.TypeBlobStorageBackend:
			var b papi.BlobStorageBackend
			if err := json.Unmarshal(c.Component, &b); err != nil {
				return fmt.Errorf("component %s: %v", name, err)
			}
			if _, err := base64.StdEncoding.DecodeString(b.Base64); err != nil {
				return fmt.Errorf("component %s: blob is not base64: %v", name, err)
			}
		case papi.TypeFileStorageBackend:
			var f papi.FileStorageBackend
			if err := json.Unmarshal(c.Component, &f); err != nil {
				return fmt.Errorf("component %s: %v", name, err)
			}
			if f.Path == "" {
				return fmt.Errorf("component %s: empty file path", name)
			}
		}
	}
	for name, d := range devices {
		b, ok := spec.Components[d.backend]
		if !ok {
			return fmt.Errorf("component %s: backend %q is not in the spec", name, d.backend)
		}
		kindOK := false
		for _, k := range d.kinds {
			kindOK = kindOK || b.Type == k
		}
		if !kindOK {
			return fmt.Errorf("component %s: backend %q is a %s, which cannot back it", name, d.backend, b.Type)
		}
		if other, ok := usedBackends[d.backend]; ok {
			return fmt.Errorf("components %s and %s share backend %q", other, name, d.backend)
		}
		usedBackends[d.backend] = name
	}
	for name, c := range spec.Components {
		if c.Type != papi.TypeBootSettings {
			continue
		}
		var bs papi.BootSettings
		if err := json.Unmarshal(c.Component, &bs); err != nil {
			return fmt.Errorf("component %s: %v", name, err)
		}
		for _, e := range bs.Order {
			if !disks[e.ID] {
				return fmt.Errorf("boot settings %s: boot order entry %q is not a disk in the spec", name, e.ID)
			}
		}
	}
	return nil
}

func (s *Server) putState(w http.ResponseWriter, body []byte) {
	var req papi.StateRequest
	if err := json.Unmarshal(body, &req); err != nil {
		writeError(w, http.StatusBadRequest, "", "unable to parse JSON body: "+err.Error())
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.inst
	if in == nil || in.final {
		noInstance(w)
		return
	}
	switch req {
	case papi.RequestRun:
		switch {
		case in.state == papi.StateFailed:
			forbidden(w, "Instance failed to start or halted due to a failure")
			return
		case in.state == papi.StateStopped || in.state == papi.StateDestroyed:
			forbidden(w, "Instance has already halted")
			return
		case in.halting:
			forbidden(w, "Instance is preparing to stop")
			return
		case !in.started:
			in.started = true
			s.setLocked(in, papi.StateStarting)
			s.afterLocked(func() {
				if in.state != papi.StateStarting {
					return
				}
				if in.halting {
					s.haltLocked(in)
					return
				}
				s.setLocked(in, papi.StateRunning)
			})
		}
	case papi.RequestStop:
		if in.halting || in.state == papi.StateStopped || in.state == papi.StateFailed {
			break // already stopping or halted: ignored, as the real server does
		}
		in.halting = true
		if in.state != papi.StateStarting && in.state != papi.StateRebooting {
			s.haltLocked(in) // a transition in progress halts when it ends
		}
	case papi.RequestReboot:
		switch {
		case in.halting || in.state == papi.StateStopped:
			forbidden(w, "Instance is preparing to stop")
			return
		case in.state != papi.StateRunning:
			forbidden(w, "Operation requires an active instance")
			return
		}
		s.setLocked(in, papi.StateRebooting)
		s.afterLocked(func() {
			switch {
			case in.state != papi.StateRebooting:
			case in.halting:
				s.haltLocked(in)
			default:
				s.setLocked(in, papi.StateRunning)
			}
		})
	default:
		writeError(w, http.StatusBadRequest, "", fmt.Sprintf("unknown requested state %q", req))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// haltLocked runs the hard halt: Stopping, Stopped, then Destroyed once
// the instance has run down.
func (s *Server) haltLocked(in *instance) {
	s.setLocked(in, papi.StateStopping)
	s.afterLocked(func() {
		s.setLocked(in, papi.StateStopped)
		s.afterLocked(func() {
			s.setLocked(in, papi.StateDestroyed)
			in.final = true
			for c := range in.clients {
				c.close(websocket.StatusNormalClosure, "instance destroyed")
			}
		})
	})
}

func (s *Server) setLocked(in *instance, st papi.InstanceState) {
	in.state = st
	in.gen++
	close(in.changed)
	in.changed = make(chan struct{})
}

// afterLocked runs fn under the lock after one step, unless the server died.
func (s *Server) afterLocked(fn func()) {
	if s.frozen {
		return
	}
	var t *time.Timer
	t = time.AfterFunc(s.opts.Step, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		delete(s.timers, t)
		if s.frozen || s.Dead() {
			return
		}
		fn()
	})
	s.timers[t] = struct{}{}
}

func (s *Server) stateMonitor(w http.ResponseWriter, r *http.Request, body []byte) {
	var req papi.StateMonitorRequest
	if err := json.Unmarshal(body, &req); err != nil {
		writeError(w, http.StatusBadRequest, "", "unable to parse JSON body: "+err.Error())
		return
	}
	s.mu.Lock()
	in := s.inst
	if in == nil {
		s.mu.Unlock()
		noInstance(w)
		return
	}
	for {
		if req.Gen <= in.gen {
			resp := papi.StateMonitorResponse{Gen: in.gen, State: in.state,
				Migration: papi.MigrationStatus{MigrationIn: json.RawMessage("null"), MigrationOut: json.RawMessage("null")}}
			s.mu.Unlock()
			writeJSON(w, http.StatusOK, resp)
			return
		}
		if in.final {
			s.mu.Unlock()
			writeError(w, http.StatusGone, papi.CodeNoInstance, fmt.Sprintf("No instance present; will never reach generation %d", req.Gen))
			return
		}
		ch := in.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-r.Context().Done():
			return
		case <-s.dead:
			panic(http.ErrAbortHandler)
		}
		s.mu.Lock()
	}
}

// ---- context helpers for tests ----

// WaitState waits until the current instance is in state st.
func (s *Server) WaitState(ctx context.Context, st papi.InstanceState) error {
	for {
		s.mu.Lock()
		in := s.inst
		if in != nil && in.state == st {
			s.mu.Unlock()
			return nil
		}
		var ch <-chan struct{}
		if in != nil {
			ch = in.changed
		}
		s.mu.Unlock()
		if ch == nil {
			t := time.NewTimer(5 * time.Millisecond)
			select {
			case <-t.C:
				continue
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			}
		}
		select {
		case <-ch:
		case <-time.After(5 * time.Millisecond): // a new ensure replaces the instance
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

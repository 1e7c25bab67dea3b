// Package backends defines the Hypervisor interface every backend implements
// and the Router that picks one by BackendTag.
package backends

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/vmherd/vmherd/api"
)

// Hypervisor runs lifecycle calls on one host. Every call is idempotent:
// repeating a call whose effect already happened returns the current handle,
// never a second VM.
type Hypervisor interface {
	Prepare(ctx context.Context, spec api.VmSpec) (api.VmHandle, error)
	Start(ctx context.Context, h api.VmHandle) (api.VmHandle, error)
	Stop(ctx context.Context, h api.VmHandle, timeout time.Duration) (api.VmHandle, error)
	Suspend(ctx context.Context, h api.VmHandle) (api.VmHandle, error)
	Resume(ctx context.Context, h api.VmHandle) (api.VmHandle, error)
	Destroy(ctx context.Context, h api.VmHandle) error
	State(ctx context.Context, h api.VmHandle) (api.VmState, error)
	GuestIP(ctx context.Context, h api.VmHandle) (string, error)
	ConsoleEndpoint(h api.VmHandle) (api.ConsoleEndpoint, error)
}

// Error categories. Backends wrap them with %w and a message that says what
// happened, to what, and what to do next.
var (
	// ErrUnsupported: the backend cannot do this at all (Propolis suspend).
	ErrUnsupported = errors.New("not supported by this backend")
	// ErrNotFound: the backend knows no VM for this handle.
	ErrNotFound = errors.New("vm not found")
	// ErrNotRunning: the call needs a running VM.
	ErrNotRunning = errors.New("vm not running")
	// ErrNoAddress: the VM has no guest address (yet, or no network).
	ErrNoAddress = errors.New("no guest address")
	// ErrInjected: a failure injected for tests and benchmarks.
	ErrInjected = errors.New("injected failure")
)

// Capable is implemented by backends that cannot do every action.
type Capable interface {
	Capabilities() api.Capabilities
}

// CapabilitiesOf returns a backend's capabilities (everything, by default).
func CapabilitiesOf(h Hypervisor) api.Capabilities {
	if c, ok := h.(Capable); ok {
		return c.Capabilities()
	}
	_, m := h.(Migrator)
	return api.Capabilities{Suspend: true, Resume: true, Migrate: m}
}

// Describer is implemented by backends whose handle data (VmHandle.Data,
// which only they read) has something worth showing: the worker's state
// query returns it, vmctl status prints it.
type Describer interface {
	// Details names what is worth showing of h: "accel", "vnc", "ssh", ...
	Details(h api.VmHandle) map[string]string
}

// SSHForwarder is implemented by backends with user-mode networking,
// where the guest is reachable from its host only through a port
// forwarded to its port 22.
type SSHForwarder interface {
	// ForwardedSSH returns the 127.0.0.1 port forwarded to h's guest port
	// 22, or 0 when there is none.
	ForwardedSSH(h api.VmHandle) int
}

// Exit is an observation that a VM's hypervisor process ended without a
// command: a crash, a kill, a guest poweroff.
type Exit struct {
	Handle api.VmHandle // the incarnation that ended (ID and PID as observed)
	Reason string
}

// Watcher is implemented by backends that notice their VMs ending. The
// channel is closed when ctx ends.
type Watcher interface {
	Watch(ctx context.Context) <-chan Exit
}

// Adopter is implemented by backends that can find VMs left running by a
// previous worker process and take them back.
type Adopter interface {
	// Adopt checks what became of h, which the records say is in state
	// recorded, and takes ownership of it again, returning the refreshed
	// handle and the state it really is in.
	Adopt(ctx context.Context, h api.VmHandle, recorded api.VmState) (api.VmHandle, api.VmState, error)
}

// Router dispatches each call to the backend named by the handle's tag.
// Prepare uses spec.Backend, else the host's default.
type Router struct {
	backends map[api.BackendTag]Hypervisor
	def      api.BackendTag
}

var _ Hypervisor = (*Router)(nil)

// NewRouter builds a router over the given backends. def must be one of them.
func NewRouter(def api.BackendTag, bs map[api.BackendTag]Hypervisor) (*Router, error) {
	if _, ok := bs[def]; !ok {
		return nil, fmt.Errorf("default backend %q is not enabled on this host (enabled: %v)", def, tags(bs))
	}
	return &Router{backends: bs, def: def}, nil
}

func tags(bs map[api.BackendTag]Hypervisor) []api.BackendTag {
	var out []api.BackendTag
	for _, t := range api.Backends {
		if _, ok := bs[t]; ok {
			out = append(out, t)
		}
	}
	return out
}

// Default is the backend used when a spec names none.
func (r *Router) Default() api.BackendTag { return r.def }

// Tags lists the enabled backends.
func (r *Router) Tags() []api.BackendTag { return tags(r.backends) }

// Backend returns the backend for a tag.
func (r *Router) Backend(t api.BackendTag) (Hypervisor, error) {
	if t == "" {
		t = r.def
	}
	b, ok := r.backends[t]
	if !ok {
		return nil, fmt.Errorf("backend %q is not enabled on this host (enabled: %v); start the worker with --backends including it", t, r.Tags())
	}
	return b, nil
}

func (r *Router) Prepare(ctx context.Context, spec api.VmSpec) (api.VmHandle, error) {
	if spec.Backend == "" {
		spec.Backend = r.def
	}
	b, err := r.Backend(spec.Backend)
	if err != nil {
		return api.VmHandle{}, err
	}
	return b.Prepare(ctx, spec)
}

func (r *Router) Start(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	b, err := r.Backend(h.Backend)
	if err != nil {
		return h, err
	}
	return b.Start(ctx, h)
}

func (r *Router) Stop(ctx context.Context, h api.VmHandle, timeout time.Duration) (api.VmHandle, error) {
	b, err := r.Backend(h.Backend)
	if err != nil {
		return h, err
	}
	return b.Stop(ctx, h, timeout)
}

func (r *Router) Suspend(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	b, err := r.Backend(h.Backend)
	if err != nil {
		return h, err
	}
	return b.Suspend(ctx, h)
}

func (r *Router) Resume(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	b, err := r.Backend(h.Backend)
	if err != nil {
		return h, err
	}
	return b.Resume(ctx, h)
}

func (r *Router) Destroy(ctx context.Context, h api.VmHandle) error {
	b, err := r.Backend(h.Backend)
	if err != nil {
		return err
	}
	return b.Destroy(ctx, h)
}

func (r *Router) State(ctx context.Context, h api.VmHandle) (api.VmState, error) {
	b, err := r.Backend(h.Backend)
	if err != nil {
		return "", err
	}
	return b.State(ctx, h)
}

func (r *Router) GuestIP(ctx context.Context, h api.VmHandle) (string, error) {
	b, err := r.Backend(h.Backend)
	if err != nil {
		return "", err
	}
	return b.GuestIP(ctx, h)
}

// Details asks h's backend what is worth showing of its data (nil when
// it says nothing).
func (r *Router) Details(h api.VmHandle) map[string]string {
	if b, err := r.Backend(h.Backend); err == nil {
		if d, ok := b.(Describer); ok {
			return d.Details(h)
		}
	}
	return nil
}

// ForwardedSSH asks h's backend for the port forwarded to its guest's
// port 22 (0: none, or a backend without forwarding).
func (r *Router) ForwardedSSH(h api.VmHandle) int {
	if b, err := r.Backend(h.Backend); err == nil {
		if f, ok := b.(SSHForwarder); ok {
			return f.ForwardedSSH(h)
		}
	}
	return 0
}

// ConsoleDialer is a backend whose console is not a unix socket (and so
// not a file of the host either): it opens the console, and reads what
// it printed, itself. The worker's relay asks the Router, which asks the
// backend that serves the endpoint's kind.
type ConsoleDialer interface {
	// ConsoleKind is the kind of endpoint the backend opens.
	ConsoleKind() api.ConsoleKind
	DialConsole(ctx context.Context, ep api.ConsoleEndpoint) (io.ReadWriteCloser, error)
	// ConsoleHistory returns what the console printed from byte offset
	// from (hasFrom), or all of it, and the offset after it.
	ConsoleHistory(ctx context.Context, ep api.ConsoleEndpoint, from uint64, hasFrom bool) (data []byte, next uint64, err error)
}

// consoleDialer is the enabled backend that opens consoles of kind k.
func (r *Router) consoleDialer(k api.ConsoleKind) ConsoleDialer {
	for _, b := range r.backends {
		if d, ok := b.(ConsoleDialer); ok && d.ConsoleKind() == k {
			return d
		}
	}
	return nil
}

// DialConsole opens a console endpoint: a unix socket here, or through
// the backend that serves its kind.
func (r *Router) DialConsole(ctx context.Context, ep api.ConsoleEndpoint) (io.ReadWriteCloser, error) {
	if d := r.consoleDialer(ep.Kind); d != nil {
		return d.DialConsole(ctx, ep)
	}
	if ep.Kind != api.ConsoleUnixSocket {
		return nil, fmt.Errorf("this VM has no console this host can open (console kind %q)", ep.Kind)
	}
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "unix", ep.Path)
	if err != nil {
		return nil, fmt.Errorf("connecting to the console socket %s: %w", ep.Path, err)
	}
	return c, nil
}

// ConsoleHistory reads a console's output through the backend that serves
// its kind (one without a log file).
func (r *Router) ConsoleHistory(ctx context.Context, ep api.ConsoleEndpoint, from uint64, hasFrom bool) ([]byte, uint64, error) {
	if d := r.consoleDialer(ep.Kind); d != nil {
		return d.ConsoleHistory(ctx, ep, from, hasFrom)
	}
	return nil, 0, fmt.Errorf("this VM keeps no console log (console kind %q)", ep.Kind)
}

func (r *Router) ConsoleEndpoint(h api.VmHandle) (api.ConsoleEndpoint, error) {
	b, err := r.Backend(h.Backend)
	if err != nil {
		return api.ConsoleEndpoint{}, err
	}
	return b.ConsoleEndpoint(h)
}

// Watch merges the exit observations of every backend that has them.
func (r *Router) Watch(ctx context.Context) <-chan Exit {
	out := make(chan Exit)
	n := 0
	done := make(chan struct{})
	for _, b := range r.backends {
		w, ok := b.(Watcher)
		if !ok {
			continue
		}
		n++
		ch := w.Watch(ctx)
		go func() {
			defer func() { done <- struct{}{} }()
			for e := range ch {
				select {
				case out <- e:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	go func() {
		for i := 0; i < n; i++ {
			<-done
		}
		close(out)
	}()
	return out
}

// Adopt re-attaches a handle left by a previous worker process. Backends
// without Adopt report the handle's state as they see it.
func (r *Router) Adopt(ctx context.Context, h api.VmHandle, recorded api.VmState) (api.VmHandle, api.VmState, error) {
	b, err := r.Backend(h.Backend)
	if err != nil {
		return h, "", err
	}
	if a, ok := b.(Adopter); ok {
		return a.Adopt(ctx, h, recorded)
	}
	st, err := b.State(ctx, h)
	return h, st, err
}

// api.Capabilities of one enabled backend.
// RemoteImager is implemented by backends whose image paths name files
// on another machine (Propolis with already-running servers): the worker
// cannot check those against its image roots.
type RemoteImager interface {
	RemoteImages() bool
}

// LocalImages reports whether backend t reads a spec's image_path on this
// host, where the worker's image roots apply.
func (r *Router) LocalImages(t api.BackendTag) bool {
	b, err := r.Backend(t)
	if err != nil {
		return true
	}
	ri, ok := b.(RemoteImager)
	return !ok || !ri.RemoteImages()
}

func (r *Router) Capabilities(t api.BackendTag) api.Capabilities {
	b, err := r.Backend(t)
	if err != nil {
		return api.Capabilities{}
	}
	return CapabilitiesOf(b)
}

// Migrator is implemented by backends that move VMs between hosts. The
// worker runs the protocol (docs/architecture.md, "Moving a VM": who
// waits for which stored event); the backend moves the bytes. Every
// call is idempotent for the same handle, so a worker that restarted
// half way repeats it.
type Migrator interface {
	// Receive makes, on the target host, the copy of the VM whose source
	// handle is src, over base (this host's file of its base image).
	// Live, the copy is paused and waits for the source's disk and
	// memory at the endpoint returned; cold, it first copies the disk
	// from the source's export at from. The copy runs nothing until
	// Activate.
	Receive(ctx context.Context, src api.VmHandle, base string, r Receiving) (api.VmHandle, string, error)
	// Send, on the source, live: copies the disk's own layer and the
	// guest's memory to the target's endpoint and returns once the guest
	// is paused here and wholly there. It reports progress as it goes;
	// it gives up when no progress is made for o.Stall.
	Send(ctx context.Context, h api.VmHandle, endpoint string, o SendOptions, progress func(MigrationProgress)) (MigrationProgress, error)
	// Export, on the source, cold: serves the VM's disk layer for the
	// target to copy, and returns where, with its size and digest.
	// Unexport ends it.
	// (Its Listen and ports are this host's, as for Receive.)
	Export(ctx context.Context, h api.VmHandle, l Receiving) (endpoint string, size int64, digest string, err error)
	Unexport(ctx context.Context, h api.VmHandle) error
	// Activate, on the target once the switch is stored: the copy is the
	// VM, in state before (live: its guest resumed if that is running).
	Activate(ctx context.Context, h api.VmHandle, before api.VmState) (api.VmHandle, error)
	// Abandon, on the target once the migration failed or was
	// cancelled: removes the copy.
	Abandon(ctx context.Context, h api.VmHandle) error
	// Recover, on the source once the migration failed or was
	// cancelled: stops sending and puts the VM back in state before
	// (live: its guest resumed if that is running).
	Recover(ctx context.Context, h api.VmHandle, before api.VmState) (api.VmHandle, error)
}

// Receiving is what Receive is told.
type Receiving struct {
	Mode string // events.MigrateLive or MigrateCold
	// Listen is the address the copy's endpoints listen on (an address
	// of this host the source can reach); Ports the range they take.
	Listen     string
	PortLo     int
	PortHi     int
	From       string // cold: the source's export
	FromSize   int64  // cold: its size
	FromDigest string // cold: its sha256
}

// SendOptions bound a live send.
type SendOptions struct {
	Stall        time.Duration // no progress for this long: give up
	DowntimeMS   int           // the longest pause at the switch QEMU aims for
	BandwidthBps int64         // 0: no limit
}

// MigrationProgress is how far a send got.
type MigrationProgress struct {
	Phase      string // copying (disk, then memory) or switchover
	Bytes      int64  // sent so far
	Total      int64  // to send, as known now
	DowntimeMS int64  // the guest's pause at the switch (once done)
}

// Migrator returns the migrator of backend t, if it has one.
func (r *Router) Migrator(t api.BackendTag) (Migrator, bool) {
	b, err := r.Backend(t)
	if err != nil {
		return nil, false
	}
	m, ok := b.(Migrator)
	return m, ok
}

// Stats is one sample of a VM's live counters, as its hypervisor sees
// them. Counters count from the start of the hypervisor process (a
// restart begins them at zero again); a rate is the difference of two
// samples over the difference of their times.
type Stats struct {
	Time      time.Time   // when the sample was taken
	StartedAt time.Time   // when the hypervisor process started
	State     api.VmState // the VM's state as the hypervisor reports it now
	// CPUTime is the CPU time the whole hypervisor process used (vCPUs,
	// device emulation, I/O threads), user and system.
	CPUTime time.Duration
	Vcpus   []VcpuStats
	// MemoryBytes is the guest's memory (the balloon's actual size when
	// there is a balloon, else the configured size); RSSBytes the
	// hypervisor process's resident memory, 0 if unknown.
	MemoryBytes int64
	RSSBytes    int64
	Disks       []DiskStats
	// Nets are the guest's NICs' counters, as the guest sees them (rx:
	// received by the guest). NetsUnavailable says why there are none
	// when the VM has NICs whose counters the backend cannot read.
	Nets            []NetStats
	NetsUnavailable string
	// Simulated: the counters are made up (the Noop backend).
	Simulated bool
}

// VcpuStats is one vCPU: its thread on the host, if it has one of its
// own, and the CPU time that thread used.
type VcpuStats struct {
	Index    int
	ThreadID int
	CPUTime  time.Duration
}

// DiskStats are one block device's counters since the process started.
type DiskStats struct {
	Device                         string
	RdBytes, WrBytes, RdOps, WrOps int64
}

// NetStats are one NIC's counters, from the guest's side.
type NetStats struct {
	Name                                   string
	RxBytes, TxBytes, RxPackets, TxPackets int64
}

// Stater is implemented by backends that report live counters of their
// VMs. Stats of a VM whose process does not run is ErrNotRunning.
type Stater interface {
	Stats(ctx context.Context, h api.VmHandle) (Stats, error)
}

// Stats samples the live counters of h's VM; a backend without them
// answers ErrUnsupported.
func (r *Router) Stats(ctx context.Context, h api.VmHandle) (Stats, error) {
	t := h.Backend
	if t == "" {
		t = r.def
	}
	b, err := r.Backend(t)
	if err != nil {
		return Stats{}, err
	}
	s, ok := b.(Stater)
	if !ok {
		return Stats{}, fmt.Errorf("live stats of vm %s: the %s backend does not report counters: %w", h.Name, t, ErrUnsupported)
	}
	return s.Stats(ctx, h)
}

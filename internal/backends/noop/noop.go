// Package noop is a backend that runs no VMs but keeps honest state: State
// reports what the last call did. Latency and failures can be injected per
// call so tests and benchmarks can exercise slow and failing backends.
package noop

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
)

// Calls that can be slowed down or failed.
const (
	CallPrepare = "prepare"
	CallStart   = "start"
	CallStop    = "stop"
	CallSuspend = "suspend"
	CallResume  = "resume"
	CallDestroy = "destroy"
)

// Options configure fault injection.
type Options struct {
	// Latency is added to every mutating call; CallLatency overrides it per call.
	Latency     time.Duration
	CallLatency map[string]time.Duration
	// FailRate is the probability (0..1) that a mutating call fails with
	// ErrInjected before it has any effect.
	FailRate float64
	// StateDir, if set, keeps each VM's state in a file there, so that VMs
	// outlive a worker process (as QEMU processes do) and several worker
	// processes on one host see the same hypervisor.
	StateDir string
}

type entry struct {
	H     api.VmHandle `json:"handle"`
	State api.VmState  `json:"state"`
	// Effects counts the calls that changed this VM's state, across its
	// incarnations; in StateDir mode it is written in the same atomic file
	// write as the change itself, so a crash cannot split the two.
	Effects map[string]int `json:"effects,omitempty"`
}

// Backend is the Noop hypervisor.
type Backend struct {
	opts Options

	mu      sync.Mutex
	vms     map[string]*entry
	nextPID int
	effects map[string]int // call -> number of calls that changed state
	failN   map[string]int // call -> number of upcoming calls to fail
	calls   map[string]int // call -> number of calls begun
	exits   chan backends.Exit
}

var (
	_ backends.Hypervisor = (*Backend)(nil)
	_ backends.Watcher    = (*Backend)(nil)
	_ backends.Adopter    = (*Backend)(nil)
)

// New returns a Noop backend.
func New(opts Options) *Backend {
	if opts.StateDir != "" {
		_ = os.MkdirAll(opts.StateDir, 0o700)
	}
	return &Backend{
		opts:    opts,
		vms:     map[string]*entry{},
		nextPID: 1000,
		effects: map[string]int{},
		failN:   map[string]int{},
		calls:   map[string]int{},
		exits:   make(chan backends.Exit, 64),
	}
}

// Capabilities: the Noop backend can do everything (a migration is
// simulated: the copy moves between the hosts' Noop backends, no bytes).
func (b *Backend) Capabilities() api.Capabilities {
	return api.Capabilities{Suspend: true, Resume: true, Migrate: true}
}

// SetLatency changes the latency of one call (all calls if call is "").
func (b *Backend) SetLatency(call string, d time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if call == "" {
		b.opts.Latency = d
		return
	}
	m := make(map[string]time.Duration, len(b.opts.CallLatency)+1)
	for k, v := range b.opts.CallLatency {
		m[k] = v
	}
	m[call] = d
	b.opts.CallLatency = m
}

// FailNext makes the next n calls of the given kind fail with ErrInjected.
func (b *Backend) FailNext(call string, n int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.failN[call] += n
}

// Effects reports how many calls of a kind changed state.
func (b *Backend) Effects(call string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.effects[call]
}

// Calls reports how many calls of a kind have begun (effect or not).
func (b *Backend) Calls(call string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.calls[call]
}

// Crash makes a running or suspended VM end as if its process died, and
// reports it to Watch. It returns false if the VM was not running.
func (b *Backend) Crash(name, reason string) bool {
	b.mu.Lock()
	e, ok := b.get(name)
	if !ok || (e.State != api.StateRunning && e.State != api.StateSuspended) {
		b.mu.Unlock()
		return false
	}
	dead := e.H.Clone()
	e.State = api.StateStopped
	e.H.PID = 0
	b.put(name, e)
	b.mu.Unlock()
	b.exits <- backends.Exit{Handle: dead, Reason: reason}
	return true
}

// Watch reports VMs that Crash ended.
func (b *Backend) Watch(ctx context.Context) <-chan backends.Exit {
	out := make(chan backends.Exit)
	go func() {
		defer close(out)
		for {
			select {
			case <-ctx.Done():
				return
			case e := <-b.exits:
				select {
				case out <- e:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out
}

// delay waits the injected latency for call, or fails it, before any effect.
func (b *Backend) delay(ctx context.Context, call string) error {
	b.mu.Lock()
	b.calls[call]++
	d := b.opts.Latency
	if cd, ok := b.opts.CallLatency[call]; ok {
		d = cd
	}
	fail := false
	if b.failN[call] > 0 {
		b.failN[call]--
		fail = true
	} else if b.opts.FailRate > 0 && mrand.Float64() < b.opts.FailRate {
		fail = true
	}
	b.mu.Unlock()
	if d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return fmt.Errorf("noop %s: %w", call, ctx.Err())
		}
	}
	if fail {
		return fmt.Errorf("noop %s: %w", call, backends.ErrInjected)
	}
	return nil
}

func newID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (b *Backend) Prepare(ctx context.Context, spec api.VmSpec) (api.VmHandle, error) {
	if err := api.ValidateName(spec.Name); err != nil {
		return api.VmHandle{}, fmt.Errorf("preparing vm: %w", err)
	}
	if err := b.delay(ctx, CallPrepare); err != nil {
		return api.VmHandle{}, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if e, ok := b.get(spec.Name); ok {
		return e.H.Clone(), nil
	}
	spec.Backend = api.BackendNoop
	s := spec
	h := api.VmHandle{ID: newID(), Name: spec.Name, Backend: api.BackendNoop, Spec: &s}
	e := &entry{H: h, State: api.StatePrepared, Effects: b.tombstoneEffects(spec.Name)}
	b.effect(e, CallPrepare)
	b.put(spec.Name, e)
	return h.Clone(), nil
}

func (b *Backend) lookup(h api.VmHandle) (*entry, error) {
	e, ok := b.get(h.Name)
	if !ok || (h.ID != "" && e.H.ID != h.ID) {
		return nil, fmt.Errorf("noop vm %s (handle %s): %w; prepare it first", h.Name, h.ID, backends.ErrNotFound)
	}
	return e, nil
}

// transition applies call to the VM if it is in one of from, returns the
// current handle if it already is in to, and fails otherwise.
func (b *Backend) transition(ctx context.Context, call string, h api.VmHandle, to api.VmState, from ...api.VmState) (api.VmHandle, error) {
	if err := b.delay(ctx, call); err != nil {
		return h, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	e, err := b.lookup(h)
	if err != nil {
		return h, err
	}
	if e.State == to {
		return e.H.Clone(), nil
	}
	for _, f := range from {
		if e.State == f {
			e.State = to
			switch to {
			case api.StateRunning:
				if call == CallStart {
					b.nextPID++
					e.H.PID = b.nextPID
					if b.opts.StateDir != "" {
						// Several processes share the state: make PIDs unlikely to repeat.
						e.H.PID = 1000 + mrand.IntN(1<<22)
					}
					e.H.StartedAt = time.Now().UTC()
				}
			case api.StateStopped:
				e.H.PID = 0
			}
			b.effect(e, call)
			b.put(h.Name, e)
			return e.H.Clone(), nil
		}
	}
	return e.H.Clone(), fmt.Errorf("noop vm %s: cannot %s while %s: %w", h.Name, call, e.State, backends.ErrNotRunning)
}

func (b *Backend) Start(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	return b.transition(ctx, CallStart, h, api.StateRunning, api.StatePrepared, api.StateStopped, api.StateFailed)
}

func (b *Backend) Stop(ctx context.Context, h api.VmHandle, _ time.Duration) (api.VmHandle, error) {
	return b.transition(ctx, CallStop, h, api.StateStopped, api.StateRunning, api.StateSuspended)
}

func (b *Backend) Suspend(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	return b.transition(ctx, CallSuspend, h, api.StateSuspended, api.StateRunning)
}

func (b *Backend) Resume(ctx context.Context, h api.VmHandle) (api.VmHandle, error) {
	return b.transition(ctx, CallResume, h, api.StateRunning, api.StateSuspended)
}

func (b *Backend) Destroy(ctx context.Context, h api.VmHandle) error {
	if err := b.delay(ctx, CallDestroy); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	e, ok := b.get(h.Name)
	if !ok || (h.ID != "" && e.H.ID != h.ID) {
		return nil // already gone: idempotent
	}
	b.effect(e, CallDestroy)
	b.del(h.Name, e)
	return nil
}

func (b *Backend) State(_ context.Context, h api.VmHandle) (api.VmState, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	e, ok := b.get(h.Name)
	if !ok || (h.ID != "" && e.H.ID != h.ID) {
		return "", fmt.Errorf("noop vm %s: %w", h.Name, backends.ErrNotFound)
	}
	return e.State, nil
}

// Adopt returns the backend's view of h. A Noop backend lives in memory, so
// after a worker restart it knows nothing of h; it then models a hypervisor
// whose VMs outlived the worker (as daemonized QEMU processes do) and takes
// the recorded state as the truth.
func (b *Backend) Adopt(_ context.Context, h api.VmHandle, recorded api.VmState) (api.VmHandle, api.VmState, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if e, ok := b.get(h.Name); ok && (h.ID == "" || e.H.ID == h.ID) {
		return e.H.Clone(), e.State, nil
	}
	if t, ok := b.tombstone(h.Name); ok && h.ID != "" && t.H.ID == h.ID {
		// This incarnation was destroyed here (its process and disk are
		// gone): there is nothing to adopt, whatever the record says.
		return h, "", fmt.Errorf("noop vm %s (handle %s) was destroyed: %w", h.Name, h.ID, backends.ErrNotFound)
	}
	switch recorded {
	case api.StatePrepared, api.StateRunning, api.StateStopped, api.StateSuspended, api.StateFailed:
	default:
		return h, "", fmt.Errorf("noop vm %s: nothing to adopt in state %s: %w", h.Name, recorded, backends.ErrNotFound)
	}
	h = h.Clone()
	b.put(h.Name, &entry{H: h, State: recorded, Effects: b.tombstoneEffects(h.Name)})
	return h.Clone(), recorded, nil
}

func (b *Backend) GuestIP(_ context.Context, h api.VmHandle) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, err := b.lookup(h); err != nil {
		return "", err
	}
	return "", fmt.Errorf("noop vm %s has no network: %w", h.Name, backends.ErrNoAddress)
}

func (b *Backend) ConsoleEndpoint(h api.VmHandle) (api.ConsoleEndpoint, error) {
	return api.ConsoleEndpoint{Kind: api.ConsoleNone}, nil
}

// get, put and del keep entries in memory, or in StateDir. Callers hold b.mu.
func (b *Backend) get(name string) (*entry, bool) {
	if b.opts.StateDir == "" {
		e, ok := b.vms[name]
		return e, ok
	}
	data, err := os.ReadFile(filepath.Join(b.opts.StateDir, name+".json"))
	if err != nil {
		return nil, false
	}
	var e entry
	if json.Unmarshal(data, &e) != nil || e.State == api.StateDestroyed {
		return nil, false // missing, or the tombstone of a destroyed VM
	}
	return &e, true
}

// tombstone returns the tombstone a destroyed VM of this name left in
// StateDir, if there is one.
func (b *Backend) tombstone(name string) (*entry, bool) {
	if b.opts.StateDir == "" {
		return nil, false
	}
	data, err := os.ReadFile(filepath.Join(b.opts.StateDir, name+".json"))
	if err != nil {
		return nil, false
	}
	var e entry
	if json.Unmarshal(data, &e) != nil || e.State != api.StateDestroyed {
		return nil, false
	}
	return &e, true
}

// tombstoneEffects returns the effect counts a destroyed VM of this name
// left behind, so they carry over to its next incarnation.
func (b *Backend) tombstoneEffects(name string) map[string]int {
	if b.opts.StateDir == "" {
		return nil
	}
	data, err := os.ReadFile(filepath.Join(b.opts.StateDir, name+".json"))
	if err != nil {
		return nil
	}
	var e entry
	if json.Unmarshal(data, &e) != nil {
		return nil
	}
	return e.Effects
}

func (b *Backend) put(name string, e *entry) {
	if b.opts.StateDir == "" {
		b.vms[name] = e
		return
	}
	data, _ := json.Marshal(e)
	p := filepath.Join(b.opts.StateDir, name+".json")
	tmp := p + ".tmp" + strconv.Itoa(os.Getpid())
	if err := os.WriteFile(tmp, data, 0o600); err == nil {
		_ = os.Rename(tmp, p)
	}
}

// del forgets a destroyed VM; in StateDir mode it leaves a tombstone with
// the effect counts.
func (b *Backend) del(name string, e *entry) {
	if b.opts.StateDir == "" {
		delete(b.vms, name)
		return
	}
	t := &entry{H: api.VmHandle{ID: e.H.ID, Name: name, Backend: api.BackendNoop}, State: api.StateDestroyed, Effects: e.Effects}
	b.put(name, t)
}

// effect counts a call that changed e's state; the caller then stores e.
func (b *Backend) effect(e *entry, call string) {
	b.effects[call]++
	if e.Effects == nil {
		e.Effects = map[string]int{}
	}
	e.Effects[call]++
}

// FileEffects reads the effect counts of every VM, destroyed ones included,
// kept in a StateDir: vm name -> call -> count.
func FileEffects(dir string) (map[string]map[string]int, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, err
	}
	out := map[string]map[string]int{}
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		var e entry
		if err := json.Unmarshal(data, &e); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		out[strings.TrimSuffix(filepath.Base(p), ".json")] = e.Effects
	}
	return out, nil
}

package worker

// Unit tests of the worker's task path, fencing and adoption: the
// worker's own functions (runTask, fence, adopt) called directly, with a
// fake task message (jetstream.Msg), a fake in front of the event store
// (eventLog) where a failure is needed, the Noop backend behind the
// router, and a real embedded NATS server for the streams and buckets.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/natsserver"
	"github.com/vmherd/vmherd/internal/projection"
)

// fakeMsg is a task as the consumer delivers it; it records what the
// worker answers.
type fakeMsg struct {
	data      []byte
	delivered uint64

	mu       sync.Mutex
	acks     int
	naks     int
	nakDelay time.Duration
	terms    int
	progress int
}

var _ jetstream.Msg = (*fakeMsg)(nil)

func (m *fakeMsg) Metadata() (*jetstream.MsgMetadata, error) {
	return &jetstream.MsgMetadata{NumDelivered: m.delivered, Timestamp: time.Now()}, nil
}
func (m *fakeMsg) Data() []byte                       { return m.data }
func (m *fakeMsg) Headers() nats.Header               { return nil }
func (m *fakeMsg) Subject() string                    { return "vm.task.h1.x" }
func (m *fakeMsg) Reply() string                      { return "" }
func (m *fakeMsg) DoubleAck(context.Context) error    { return m.Ack() }
func (m *fakeMsg) Nak() error                         { return m.NakWithDelay(0) }
func (m *fakeMsg) TermWithReason(reason string) error { return m.Term() }
func (m *fakeMsg) Ack() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.acks++
	return nil
}
func (m *fakeMsg) NakWithDelay(d time.Duration) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.naks++
	m.nakDelay = d
	return nil
}
func (m *fakeMsg) InProgress() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.progress++
	return nil
}
func (m *fakeMsg) Term() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.terms++
	return nil
}

// answers returns acks, naks, terms and in-progress signals.
func (m *fakeMsg) answers() (acks, naks, terms, progress int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.acks, m.naks, m.terms, m.progress
}

// flakyLog is the event store with failures put in front of it.
type flakyLog struct {
	eventLog
	mu sync.Mutex
	// failAppends: how many appends fail next (-1: all).
	failAppends int
	appends     int
	failReads   int
}

var errStoreDown = errors.New("store down (injected)")

func (f *flakyLog) Append(ctx context.Context, ev *api.Event, expect uint64, msgID string) (uint64, bool, error) {
	f.mu.Lock()
	f.appends++
	fail := f.failAppends != 0
	if f.failAppends > 0 {
		f.failAppends--
	}
	f.mu.Unlock()
	if fail {
		return 0, false, errStoreDown
	}
	return f.eventLog.Append(ctx, ev, expect, msgID)
}

func (f *flakyLog) ReadVM(ctx context.Context, vmName string, from uint64) ([]events.Stored, error) {
	f.mu.Lock()
	fail := f.failReads > 0
	if fail {
		f.failReads--
	}
	f.mu.Unlock()
	if fail {
		return nil, errStoreDown
	}
	return f.eventLog.ReadVM(ctx, vmName, from)
}

func (f *flakyLog) set(failAppends, failReads int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failAppends, f.failReads, f.appends = failAppends, failReads, 0
}

func (f *flakyLog) appendCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.appends
}

// adopting is a backend whose Adopt is recorded and may report a state
// other than the Noop backend's (a QEMU found gone after a restart).
type adopting struct {
	*noop.Backend
	mu       sync.Mutex
	adopted  map[string]api.VmState // vm -> the recorded state it was asked to adopt as
	actually map[string]api.VmState // vm -> the state to report instead
}

func (a *adopting) Adopt(ctx context.Context, h api.VmHandle, recorded api.VmState) (api.VmHandle, api.VmState, error) {
	a.mu.Lock()
	a.adopted[h.Name] = recorded
	st, ok := a.actually[h.Name]
	a.mu.Unlock()
	if ok {
		h.PID = 0
		return h, st, nil
	}
	return a.Backend.Adopt(ctx, h, recorded)
}

// rig is a server with the streams and buckets, an engine's store (the
// decisions) and a worker of host h1.
type rig struct {
	t     *testing.T
	js    jetstream.JetStream
	names api.Names
	eng   *events.Store // writes as the engine
	other *events.Store // writes as the worker of h2
	nb    *noop.Backend
	w     *Worker
	log   *flakyLog
}

func newRig(t *testing.T, ackWait time.Duration) *rig {
	t.Helper()
	ns, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", StoreDir: t.TempDir(), Sync: "default"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Stop)
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	r := &rig{t: t, js: js, names: api.DefaultNames}
	if err := jsetup.Ensure(ctx, js, r.names, jsetup.DefaultSettings); err != nil {
		t.Fatal(err)
	}
	if r.eng, err = events.NewStore(ctx, js, r.names, api.EngineWriter); err != nil {
		t.Fatal(err)
	}
	if r.other, err = events.NewStore(ctx, js, r.names, "h2"); err != nil {
		t.Fatal(err)
	}
	r.nb = noop.New(noop.Options{})
	r.w, r.log = r.worker(r.nb, ackWait)
	return r
}

// worker builds a worker of h1 over backend b (a restart: a new one).
func (r *rig) worker(b backends.Hypervisor, ackWait time.Duration) (*Worker, *flakyLog) {
	r.t.Helper()
	router, err := backends.NewRouter(api.BackendNoop, map[api.BackendTag]backends.Hypervisor{api.BackendNoop: b})
	if err != nil {
		r.t.Fatal(err)
	}
	w, err := New(context.Background(), Config{
		JS: r.js, Names: r.names, Host: "h1", Router: router, AckWait: ackWait,
		Log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
		Capacity: api.Resources{Vcpus: 8, MemoryMB: 8192},
	})
	if err != nil {
		r.t.Fatal(err)
	}
	log := &flakyLog{eventLog: w.store}
	w.store = log
	return w, log
}

// events returns the VM's stored events.
func (r *rig) events(vmName string) []events.Stored {
	r.t.Helper()
	evs, err := r.eng.ReadVM(context.Background(), vmName, 1)
	if err != nil {
		r.t.Fatal(err)
	}
	return evs
}

// record folds the VM's events as the projection does.
func (r *rig) record(vmName string) *api.VmRecord {
	return projection.FoldStored(&api.VmRecord{Name: vmName, State: fsm.StateAbsent}, r.events(vmName))
}

// accept stores the engine's decision for a command and returns its task.
func (r *rig) accept(vmName, cmdID string, a fsm.Action) *events.Task {
	r.t.Helper()
	ev := &api.Event{Type: api.TypeAccepted, VM: vmName, CommandID: cmdID, Action: a,
		Host: "h1", Backend: api.BackendNoop, Time: time.Now().UTC(), Handle: r.record(vmName).Handle}
	if a == fsm.ActPrepare {
		ev.Spec = &api.VmSpec{Name: vmName, Backend: api.BackendNoop, Vcpus: 1, MemoryMB: 256}
		ev.Handle = nil
	}
	seq, _, err := r.eng.Append(context.Background(), ev, events.NoExpect, api.DecisionMsgID(vmName, cmdID))
	if err != nil {
		r.t.Fatal(err)
	}
	t := events.TaskFromAccepted(ev, seq)
	return &t
}

// run delivers t to the worker (the delivered-th time) and returns what
// the worker answered.
func (r *rig) run(w *Worker, t *events.Task, delivered uint64) *fakeMsg {
	r.t.Helper()
	b, _ := json.Marshal(t)
	m := &fakeMsg{data: b, delivered: delivered}
	w.runTask(m, t)
	return m
}

// results lists the VM's result events for a command, by writer.
func (r *rig) results(vmName, cmdID string) []*api.Event {
	var out []*api.Event
	for _, s := range r.events(vmName) {
		if s.Event != nil && s.Event.CommandID == cmdID && s.Event.Type.IsResult() {
			out = append(out, s.Event)
		}
	}
	return out
}

// create prepares and starts a VM through the worker.
func (r *rig) create(w *Worker, vmName string) {
	r.t.Helper()
	for _, a := range []fsm.Action{fsm.ActPrepare, fsm.ActStart} {
		id := vmName + "-" + string(a)
		if m := r.run(w, r.accept(vmName, id, a), 1); m.acks != 1 {
			r.t.Fatalf("%s %s: %d acks", vmName, a, m.acks)
		}
	}
	if st := r.record(vmName).State; st != api.StateRunning {
		r.t.Fatalf("%s is %s after prepare and start", vmName, st)
	}
}

func (w *Worker) view(name string) (local, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	l, ok := w.vms[name]
	if !ok {
		return local{}, false
	}
	return *l, true
}

// A task on this host's subject naming another host is refused for good
// (terminated, never redelivered) without a backend call or an event.
func TestUnitTaskForAnotherHostRefused(t *testing.T) {
	t.Parallel()
	r := newRig(t, 0)
	task := r.accept("web1", "p1", fsm.ActPrepare)
	task.Host = "h2"
	m := r.run(r.w, task, 1)
	if acks, naks, terms, _ := m.answers(); terms != 1 || acks != 0 || naks != 0 {
		t.Fatalf("acks %d naks %d terms %d, want the task terminated", acks, naks, terms)
	}
	if n := r.nb.Calls(noop.CallPrepare); n != 0 {
		t.Fatalf("%d prepare calls for another host's task", n)
	}
	if res := r.results("web1", "p1"); len(res) != 0 {
		t.Fatalf("results stored: %+v", res)
	}
}

// A task runs its backend call, stores exactly one result (with the
// handle, on this host, under the command's result message id) and is
// acked after; the worker's view follows the result.
func TestUnitTaskRunsAndAcksAfterItsResult(t *testing.T) {
	t.Parallel()
	r := newRig(t, 0)
	m := r.run(r.w, r.accept("web1", "p1", fsm.ActPrepare), 1)
	if acks, naks, terms, _ := m.answers(); acks != 1 || naks != 0 || terms != 0 {
		t.Fatalf("acks %d naks %d terms %d", acks, naks, terms)
	}
	res := r.results("web1", "p1")
	if len(res) != 1 || res[0].Type != api.TypePrepared || res[0].Writer != "h1" || res[0].Handle == nil ||
		res[0].Handle.Host != "h1" || res[0].Handle.ID == "" || res[0].State != api.StatePrepared {
		t.Fatalf("results %+v", res)
	}
	l, ok := r.w.view("web1")
	if !ok || l.handle.ID != res[0].Handle.ID || l.state != api.StatePrepared || l.spec == nil || l.spec.MemoryMB != 256 {
		t.Fatalf("worker's view %+v (known %v)", l, ok)
	}
	if hb := r.w.Heartbeat(); hb.Usage.VMs != 1 || hb.Usage.MemoryMB != 256 || hb.Usage.Vcpus != 1 {
		t.Fatalf("heartbeat usage %+v", hb.Usage)
	}

	// A failing call is a failed result that keeps the incarnation's handle.
	r.nb.FailNext(noop.CallStart, 1)
	m = r.run(r.w, r.accept("web1", "s1", fsm.ActStart), 1)
	res = r.results("web1", "s1")
	if m.acks != 1 || len(res) != 1 || res[0].Type != api.TypeFailed || res[0].Handle == nil ||
		res[0].Handle.ID != l.handle.ID || !strings.Contains(res[0].Error, backends.ErrInjected.Error()) {
		t.Fatalf("acks %d, results %+v", m.acks, res)
	}

	// Destroyed: the worker forgets the VM.
	r.run(r.w, r.accept("web1", "d1", fsm.ActDestroy), 1)
	if res := r.results("web1", "d1"); len(res) != 1 || res[0].Type != api.TypeDestroyed {
		t.Fatalf("destroy results %+v", res)
	}
	if _, ok := r.w.view("web1"); ok {
		t.Fatal("the worker still knows a destroyed vm")
	}
}

// A redelivered task whose result is already stored is acked without
// running again, and the worker learns the stored result; a result for
// the same command id written by another host's worker is not taken as
// the answer; an error reading the stream delays the task (nak), it is
// never run blind.
func TestUnitEarlierResultNotRunAgain(t *testing.T) {
	t.Parallel()
	r := newRig(t, 0)
	task := r.accept("web1", "p1", fsm.ActPrepare)
	r.run(r.w, task, 1)

	w2, _ := r.worker(r.nb, 0) // another worker process of h1: knows nothing yet
	m := r.run(w2, task, 2)
	if acks, naks, terms, _ := m.answers(); acks != 1 || naks != 0 || terms != 0 {
		t.Fatalf("redelivery: acks %d naks %d terms %d", acks, naks, terms)
	}
	if n := r.nb.Calls(noop.CallPrepare); n != 1 {
		t.Fatalf("prepare ran %d times", n)
	}
	if res := r.results("web1", "p1"); len(res) != 1 {
		t.Fatalf("%d results for one command", len(res))
	}
	if l, ok := w2.view("web1"); !ok || l.state != api.StatePrepared || l.handle.ID == "" {
		t.Fatalf("the found result was not noted: %+v %v", l, ok)
	}

	// Another host's worker answers s1 first, on its own writer token.
	start := r.accept("web1", "s1", fsm.ActStart)
	forged := &api.Event{Type: api.TypeStarted, VM: "web1", CommandID: "s1", Action: fsm.ActStart,
		State: api.StateRunning, Host: "h2", Time: time.Now().UTC()}
	if _, _, err := r.other.Append(context.Background(), forged, events.NoExpect, ""); err != nil {
		t.Fatal(err)
	}
	if m := r.run(r.w, start, 1); m.acks != 1 {
		t.Fatalf("start: %d acks", m.acks)
	}
	if n := r.nb.Calls(noop.CallStart); n != 1 {
		t.Fatalf("start ran %d times, want once despite h2's answer", n)
	}
	var mine int
	for _, ev := range r.results("web1", "s1") {
		if ev.Writer == "h1" && ev.Type == api.TypeStarted {
			mine++
		}
	}
	if mine != 1 {
		t.Fatalf("%d results of h1 for s1", mine)
	}

	// The earlier-result look fails: no call, retried later.
	r.log.set(0, 1)
	stop := r.accept("web1", "st1", fsm.ActStop)
	m = r.run(r.w, stop, 1)
	if acks, naks, _, _ := m.answers(); acks != 0 || naks != 1 || m.nakDelay <= 0 {
		t.Fatalf("acks %d naks %d (delay %s), want one delayed nak", acks, naks, m.nakDelay)
	}
	if n := r.nb.Calls(noop.CallStop); n != 0 {
		t.Fatalf("stop ran %d times without knowing whether it had", n)
	}
	if m := r.run(r.w, stop, 2); m.acks != 1 || r.nb.Calls(noop.CallStop) != 1 {
		t.Fatalf("the retried stop: acks %d, calls %d", m.acks, r.nb.Calls(noop.CallStop))
	}
}

// A call longer than a third of the ack wait signals progress every
// third of it, so JetStream does not redeliver it, and stops signalling
// once the call is over.
func TestUnitProgressWhileTheCallRuns(t *testing.T) {
	t.Parallel()
	const ackWait = 300 * time.Millisecond
	r := newRig(t, ackWait)
	r.run(r.w, r.accept("web1", "p1", fsm.ActPrepare), 1)
	r.nb.SetLatency(noop.CallStart, time.Second)
	m := r.run(r.w, r.accept("web1", "s1", fsm.ActStart), 1)
	acks, _, _, progress := m.answers()
	// A tick every 100ms over a 1s call: about 10; the machine may be slow.
	if acks != 1 || progress < 5 || progress > 11 {
		t.Fatalf("acks %d, %d progress signals over a 1s call with ack wait %s", acks, progress, ackWait)
	}
	time.Sleep(2 * ackWait)
	if _, _, _, after := m.answers(); after != progress {
		t.Fatalf("progress signalled after the task was done: %d, then %d", progress, after)
	}

	// A quick call signals none.
	m = r.run(r.w, r.accept("web1", "st1", fsm.ActStop), 1)
	if _, _, _, p := m.answers(); p != 0 {
		t.Fatalf("%d progress signals for a quick call", p)
	}
}

// Storing the result is retried until it is stored, and only then is the
// task acked (an ack before would lose the result; the call is not run
// again meanwhile); a worker killed while retrying leaves the task
// unanswered for redelivery.
func TestUnitResultAppendRetriedUntilStored(t *testing.T) {
	t.Parallel()
	r := newRig(t, 0)
	r.log.set(3, 0)
	m := r.run(r.w, r.accept("web1", "p1", fsm.ActPrepare), 1)
	if acks, naks, terms, _ := m.answers(); acks != 1 || naks != 0 || terms != 0 {
		t.Fatalf("acks %d naks %d terms %d", acks, naks, terms)
	}
	if n := r.log.appendCalls(); n != 4 {
		t.Fatalf("%d appends, want 3 failed and 1 stored", n)
	}
	if n := r.nb.Calls(noop.CallPrepare); n != 1 {
		t.Fatalf("prepare ran %d times", n)
	}
	if res := r.results("web1", "p1"); len(res) != 1 || res[0].Type != api.TypePrepared {
		t.Fatalf("results %+v", res)
	}

	// The store stays down; the worker is killed while it retries.
	r.log.set(-1, 0)
	task := r.accept("web1", "s1", fsm.ActStart)
	done := make(chan *fakeMsg)
	go func() {
		b, _ := json.Marshal(task)
		m := &fakeMsg{data: b, delivered: 1}
		r.w.runTask(m, task)
		done <- m
	}()
	deadline := time.Now().Add(10 * time.Second)
	for r.log.appendCalls() < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	r.w.Kill()
	select {
	case m := <-done:
		if acks, naks, terms, _ := m.answers(); acks+naks+terms != 0 {
			t.Fatalf("a killed worker answered: acks %d naks %d terms %d", acks, naks, terms)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("runTask still retrying 10s after the worker was killed")
	}
	if res := r.results("web1", "s1"); len(res) != 0 {
		t.Fatalf("results stored while the store was down: %+v", res)
	}
}

// A fence task (the VM was forgotten while its host was lost) destroys
// the incarnation it names, whatever the worker believed, reports
// `fenced` once and forgets the VM; a destroy that fails is retried
// (delayed nak) a few deliveries, then reported with its error.
func TestUnitFence(t *testing.T) {
	t.Parallel()
	r := newRig(t, 0)
	r.create(r.w, "lost1")
	h := r.record("lost1").Handle
	fence := &events.Task{CommandID: "f1", VM: "lost1", Action: fsm.ActDestroy, Host: "h1", Backend: api.BackendNoop,
		Handle: h, AcceptedSeq: r.record("lost1").LastSeq, Fence: true}
	m := r.run(r.w, fence, 1)
	if acks, naks, terms, _ := m.answers(); acks != 1 || naks != 0 || terms != 0 {
		t.Fatalf("acks %d naks %d terms %d", acks, naks, terms)
	}
	if _, err := r.nb.State(context.Background(), *h); !errors.Is(err, backends.ErrNotFound) {
		t.Fatalf("the fenced vm is still on the backend: %v", err)
	}
	var fenced []*api.Event
	for _, s := range r.events("lost1") {
		if s.Event != nil && s.Event.Type == api.TypeFenced {
			fenced = append(fenced, s.Event)
		}
	}
	if len(fenced) != 1 || fenced[0].CommandID != "f1" || fenced[0].Writer != "h1" || fenced[0].Error != "" ||
		fenced[0].Handle == nil || fenced[0].Handle.ID != h.ID {
		t.Fatalf("fenced events %+v", fenced)
	}
	if _, ok := r.w.view("lost1"); ok {
		t.Fatal("the worker still knows a fenced vm")
	}
	// Redelivered: the report is deduplicated by its message id.
	r.run(r.w, fence, 2)
	n := 0
	for _, s := range r.events("lost1") {
		if s.Event != nil && s.Event.Type == api.TypeFenced {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d fenced events after a redelivery", n)
	}

	// A destroy that keeps failing.
	r.create(r.w, "lost2")
	h2 := r.record("lost2").Handle
	fence2 := &events.Task{CommandID: "f2", VM: "lost2", Action: fsm.ActDestroy, Host: "h1", Backend: api.BackendNoop,
		Handle: h2, AcceptedSeq: r.record("lost2").LastSeq, Fence: true}
	r.nb.FailNext(noop.CallDestroy, 100)
	m = r.run(r.w, fence2, 1)
	if acks, naks, _, _ := m.answers(); acks != 0 || naks != 1 || m.nakDelay <= 0 {
		t.Fatalf("first failure: acks %d naks %d delay %s, want a delayed retry", acks, naks, m.nakDelay)
	}
	for _, s := range r.events("lost2") {
		if s.Event != nil && s.Event.Type == api.TypeFenced {
			t.Fatalf("fenced reported while retrying: %+v", s.Event)
		}
	}
	m = r.run(r.w, fence2, 5)
	if acks, naks, _, _ := m.answers(); acks != 1 || naks != 0 {
		t.Fatalf("fifth delivery: acks %d naks %d, want it reported", acks, naks)
	}
	var rep *api.Event
	for _, s := range r.events("lost2") {
		if s.Event != nil && s.Event.Type == api.TypeFenced {
			rep = s.Event
		}
	}
	if rep == nil || rep.Error == "" {
		t.Fatalf("fenced report with the destroy's error: %+v", rep)
	}
	if r.nb.Calls(noop.CallDestroy) != 4 { // lost1's fence and its redelivery (idempotent), lost2's two deliveries
		t.Fatalf("%d destroy calls", r.nb.Calls(noop.CallDestroy))
	}
}

// After a restart the worker re-adopts the VMs the records place on its
// host, each as its events say after the record's last sequence (the
// bucket may lag the stream): a VM stopped since is adopted stopped, one
// destroyed since is not adopted (nor re-created on the backend), another
// host's VM is left alone, and a VM recorded running whose process is
// gone gets an `exited` event.
func TestUnitAdoptAfterRestart(t *testing.T) {
	t.Parallel()
	r := newRig(t, 0)
	ctx := context.Background()
	kv, err := r.js.KeyValue(ctx, r.names.RecordsBucket())
	if err != nil {
		t.Fatal(err)
	}
	put := func(rec *api.VmRecord) {
		t.Helper()
		if _, err := kv.Put(ctx, rec.Name, rec.Marshal()); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"kept", "later", "gone", "crashed"} {
		r.create(r.w, name)
		put(r.record(name)) // the bucket as of now
	}
	// After the records were written: later stopped, gone destroyed.
	r.run(r.w, r.accept("later", "later-stop", fsm.ActStop), 1)
	r.run(r.w, r.accept("gone", "gone-destroy", fsm.ActDestroy), 1)
	if st := r.record("gone").State; st != api.StateDestroyed {
		t.Fatalf("gone is %s", st)
	}
	// A VM of h2, with a handle naming h2.
	put(&api.VmRecord{Name: "elsewhere", State: api.StateRunning, Host: "h2",
		Handle: &api.VmHandle{ID: "x", Name: "elsewhere", Backend: api.BackendNoop, Host: "h2"}})

	// The restarted worker's backend knows nothing of the VMs (the Noop
	// backend then takes the state it is asked to adopt as the truth),
	// except that crashed's process is gone.
	ab := &adopting{Backend: noop.New(noop.Options{}), adopted: map[string]api.VmState{},
		actually: map[string]api.VmState{"crashed": api.StateStopped}}
	w, _ := r.worker(ab, 0)
	if err := w.adopt(ctx); err != nil {
		t.Fatal(err)
	}
	want := map[string]api.VmState{"kept": api.StateRunning, "later": api.StateStopped, "crashed": api.StateRunning}
	if fmt.Sprint(ab.adopted) != fmt.Sprint(want) {
		t.Fatalf("adopted (name: recorded state) %v, want %v", ab.adopted, want)
	}
	for name, st := range map[string]api.VmState{"kept": api.StateRunning, "later": api.StateStopped, "crashed": api.StateStopped} {
		l, ok := w.view(name)
		if !ok || l.state != st || l.handle.ID != r.record(name).Handle.ID || l.spec == nil {
			t.Errorf("%s: worker's view %+v (known %v), want %s with the record's handle", name, l, ok, st)
		}
	}
	for _, name := range []string{"gone", "elsewhere"} {
		if _, ok := w.view(name); ok {
			t.Errorf("%s adopted", name)
		}
		if _, err := ab.State(ctx, api.VmHandle{Name: name}); !errors.Is(err, backends.ErrNotFound) {
			t.Errorf("%s exists on the restarted backend: %v", name, err)
		}
	}
	var exits []*api.Event
	for _, name := range []string{"kept", "later", "crashed"} {
		for _, s := range r.events(name) {
			if s.Event != nil && s.Event.Type == api.TypeExited {
				exits = append(exits, s.Event)
			}
		}
	}
	if len(exits) != 1 || exits[0].VM != "crashed" || exits[0].Writer != "h1" || exits[0].Handle == nil ||
		exits[0].Handle.ID != r.record("crashed").Handle.ID {
		t.Fatalf("exited events %+v, want one for crashed", exits)
	}
	if st := r.record("crashed").State; st != api.StateStopped {
		t.Fatalf("crashed folds to %s after its exit", st)
	}
	if hb := w.Heartbeat(); hb.Usage.VMs != 3 {
		t.Fatalf("heartbeat counts %d VMs after adoption, want 3", hb.Usage.VMs)
	}
}

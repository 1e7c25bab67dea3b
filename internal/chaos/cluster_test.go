package chaos_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fleet"
	"github.com/vmherd/vmherd/internal/testenv"
)

// cluster is a nats-server, engines and workers, each a real process.
type cluster struct {
	t       *testing.T
	bin     string
	natsBin string
	dir     string
	port    int
	url     string
	server  *testenv.Proc
	mu      sync.Mutex
	engines map[string]*testenv.Proc
	workers map[string]*testenv.Proc
	// noopLatency and stopLatency shape the Noop backend of every worker.
	noopLatency string
	workerArgs  []string
	// untilFaults keeps every VM cycling past its quota of commands until
	// the fault function has returned.
	untilFaults bool
	// cycle is the actions each VM goes through (default: cycle);
	// loadTimeout bounds a load (default 8 minutes).
	cycle       []string
	loadTimeout time.Duration
	// logs of every process run, in order (for explaining failures).
	logs []string
	// The server runs with authentication and TLS: authority signs every
	// process's credentials, pki its certificate.
	authority *auth.Authority
	pki       fleet.PKI
}

// creds returns the credentials file of an identity, writing it once.
func (c *cluster) creds(id auth.Identity) string {
	path := filepath.Join(c.dir, "auth", id.Name()+".creds")
	if err := c.authority.WriteCreds(path, id); err != nil {
		c.t.Fatal(err)
	}
	return path
}

// attach connects a test env with the admin's credentials.
func (c *cluster) attach() *testenv.Env {
	return testenv.AttachTLS(c.t, c.url, c.creds(auth.Identity{Role: auth.RoleAdmin}), c.pki.CA)
}

func newCluster(t *testing.T) *cluster {
	if testing.Short() {
		t.Skip("fault tests run real processes; skipped with -short")
	}
	c := &cluster{
		t: t, bin: testenv.Binaries(t), natsBin: testenv.Tool(t, "nats-server"),
		dir: t.TempDir(), port: testenv.FreePort(t),
		engines: map[string]*testenv.Proc{}, workers: map[string]*testenv.Proc{},
		noopLatency: "20ms",
	}
	c.url = fmt.Sprintf("nats://127.0.0.1:%d", c.port)
	var err error
	if c.authority, err = auth.Open(filepath.Join(c.dir, "auth")); err != nil {
		t.Fatal(err)
	}
	if c.pki, err = fleet.MakePKI(filepath.Join(c.dir, "tls"), "127.0.0.1"); err != nil {
		t.Fatal(err)
	}
	c.startServer()
	return c
}

func (c *cluster) startServer() {
	conf := filepath.Join(c.dir, "nats.conf")
	store := filepath.Join(c.dir, "jetstream")
	trust, err := c.authority.ServerConfig()
	if err != nil {
		c.t.Fatal(err)
	}
	err = os.WriteFile(conf, []byte(fmt.Sprintf("listen: 127.0.0.1:%d\njetstream { store_dir: %q, sync_interval: always }\ntls { cert_file: %q, key_file: %q, ca_file: %q }\n%s",
		c.port, store, c.pki.Cert, c.pki.Key, c.pki.CA, trust)), 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	c.server = testenv.StartProc(c.t, "nats-server", c.natsBin, nil, "-c", conf)
	c.server.WaitLog("Server is ready", 30*time.Second)
}

// restartServer stops the server (SIGTERM, file storage) and starts it again.
func (c *cluster) restartServer() {
	if err := c.server.Term(30 * time.Second); err != nil {
		c.t.Logf("nats-server stop: %v", err)
	}
	c.startServer()
}

func (c *cluster) startEngine(id string) {
	p := testenv.StartProc(c.t, "engine-"+id, filepath.Join(c.bin, "engine"), nil,
		"--nats-url", c.url, "--data-dir", filepath.Join(c.dir, "engine-"+id), "--engine-id", id,
		"--creds", c.creds(auth.Identity{Role: auth.RoleEngine}), "--tls-ca", c.pki.CA,
		"--command-ack-wait", "2s", "--host-timeout", "5s", "--log-level", "info")
	p.WaitLog("engine serving", 60*time.Second)
	c.mu.Lock()
	c.engines[id] = p
	c.mu.Unlock()
}

// startWorker runs a worker for host; several workers may serve one host
// (instance tells them apart); they share the host's Noop state dir.
func (c *cluster) startWorker(host string, instance int) {
	args := append([]string{
		"--nats-url", c.url, "--host", host, "--data-dir", filepath.Join(c.dir, "host-"+host),
		"--creds", c.creds(auth.Identity{Role: auth.RoleWorker, Host: host}), "--tls-ca", c.pki.CA,
		"--noop-state-dir", filepath.Join(c.dir, "host-"+host, "noop"),
		"--backends", "noop", "--default-backend", "noop", "--noop-latency", c.noopLatency,
		"--task-ack-wait", "2s", "--heartbeat", "500ms", "--reconcile", "2s", "--log-level", "info",
	}, c.workerArgs...)
	name := fmt.Sprintf("%s#%d", host, instance)
	p := testenv.StartProc(c.t, "worker-"+name, filepath.Join(c.bin, "worker"), nil, args...)
	p.WaitLog("worker serving", 60*time.Second)
	c.mu.Lock()
	c.workers[name] = p
	c.mu.Unlock()
}

func (c *cluster) killEngine(id string) {
	c.mu.Lock()
	p := c.engines[id]
	c.mu.Unlock()
	p.Kill()
	c.startEngine(id)
}

func (c *cluster) killWorker(host string, instance int) {
	c.mu.Lock()
	p := c.workers[fmt.Sprintf("%s#%d", host, instance)]
	c.mu.Unlock()
	p.Kill()
	c.startWorker(host, instance)
}

// effects counts backend effects per "<vm> <call>" across the hosts' Noop
// state dirs (each count is written atomically with the change it counts).
func (c *cluster) effects() map[string]int {
	out := map[string]int{}
	dirs, _ := filepath.Glob(filepath.Join(c.dir, "host-*", "noop"))
	for _, d := range dirs {
		perVM, err := noop.FileEffects(d)
		if err != nil {
			c.t.Fatal(err)
		}
		for name, calls := range perVM {
			for call, n := range calls {
				out[name+" "+call] += n
			}
		}
	}
	return out
}

// tracker follows VM_EVENTS and remembers each command's decision and result.
type tracker struct {
	mu       sync.Mutex
	decision map[string]api.EventType
	result   map[string]api.EventType
	changed  chan struct{}
	// resultTimes are when the tracker saw each result, in order.
	resultTimes []time.Time
}

// stall is the longest time without a result around moment at: from the
// last result before it to the first after it.
func (tr *tracker) stall(at time.Time) time.Duration {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var before, after time.Time
	for _, t := range tr.resultTimes {
		if !t.After(at) {
			before = t
		} else {
			after = t
			break
		}
	}
	if before.IsZero() || after.IsZero() {
		return -1
	}
	return after.Sub(before)
}

func (tr *tracker) run(ctx context.Context, js jetstream.JetStream) {
	var next uint64 = 1
	for ctx.Err() == nil {
		st, err := js.Stream(ctx, api.DefaultNames.EventsStream())
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
			DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: next,
		})
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		it, err := cons.Messages()
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		stop := context.AfterFunc(ctx, it.Stop)
		for {
			m, err := it.Next()
			if err != nil {
				break
			}
			md, _ := m.Metadata()
			next = md.Sequence.Stream + 1
			ev, err := events.Decode(m.Data())
			if err != nil || ev.CommandID == "" {
				continue
			}
			key := ev.VM + "/" + ev.CommandID
			tr.mu.Lock()
			switch {
			case ev.Type == api.TypeAccepted || ev.Type == api.TypeRejected:
				tr.decision[key] = ev.Type
			case ev.Type.IsResult():
				tr.result[key] = ev.Type
				tr.resultTimes = append(tr.resultTimes, time.Now())
			}
			tr.mu.Unlock()
			select {
			case tr.changed <- struct{}{}:
			default:
			}
		}
		stop()
		it.Stop()
	}
}

// done reports whether the command is finished: rejected, or accepted with a result.
func (tr *tracker) done(key string) (api.EventType, bool) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	d, ok := tr.decision[key]
	if !ok {
		return "", false
	}
	if d == api.TypeRejected {
		return d, true
	}
	r, ok := tr.result[key]
	return r, ok
}

type loadStats struct {
	sent, accepted, rejected, results atomic.Int64
	tr                                *tracker
}

func (s *loadStats) String() string {
	return fmt.Sprintf("commands sent=%d accepted=%d rejected=%d results=%d", s.sent.Load(), s.accepted.Load(), s.rejected.Load(), s.results.Load())
}

var cycle = []string{"prepare", "start", "suspend", "resume", "stop", "start", "stop", "destroy"}

// runLoad drives nVMs VMs through perVM commands each, closed loop: each
// VM's next command is published once the previous one is finished. Every
// publish is retried with the same message id until the server stores it.
func (c *cluster) runLoad(env *testenv.Env, nVMs, perVM int, faults func(ctx context.Context)) *loadStats {
	c.t.Helper()
	timeout, actions := c.loadTimeout, c.cycle
	if timeout == 0 {
		timeout = 8 * time.Minute
	}
	if actions == nil {
		actions = cycle
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tr := &tracker{decision: map[string]api.EventType{}, result: map[string]api.EventType{}, changed: make(chan struct{}, 1)}
	tctx, tcancel := context.WithCancel(ctx)
	defer tcancel()
	go tr.run(tctx, env.JS)
	stats := &loadStats{tr: tr}
	faultCtx, stopFaults := context.WithCancel(ctx)
	faultsDone := make(chan struct{})
	var faultsOver atomic.Bool
	go func() {
		defer close(faultsDone)
		if faults != nil {
			faults(faultCtx)
		}
		faultsOver.Store(true)
	}()
	var wg sync.WaitGroup
	errs := make(chan error, nVMs)
	for i := 0; i < nVMs; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := fmt.Sprintf("vm%03d", i)
			for j := 0; j < perVM || c.untilFaults && !faultsOver.Load(); j++ {
				action := actions[j%len(actions)]
				id := fmt.Sprintf("%s-%03d", name, j)
				body := fmt.Sprintf(`{"command_id":%q}`, id)
				if action == "prepare" {
					body = fmt.Sprintf(`{"command_id":%q,"spec":{"backend":"noop","memory_mb":64}}`, id)
				}
				if err := publish(ctx, env.JS, env.Names.Command(name, action), body, id); err != nil {
					errs <- err
					return
				}
				stats.sent.Add(1)
				key := name + "/" + id
				for {
					if t, ok := tr.done(key); ok {
						if t == api.TypeRejected {
							stats.rejected.Add(1)
						} else {
							stats.accepted.Add(1)
							stats.results.Add(1)
						}
						break
					}
					select {
					case <-ctx.Done():
						errs <- fmt.Errorf("command %s (%s) not finished: %w", id, action, ctx.Err())
						return
					case <-time.After(20 * time.Millisecond):
					}
				}
			}
		}()
	}
	wg.Wait()
	stopFaults()
	<-faultsDone
	close(errs)
	for err := range errs {
		c.t.Error(err)
	}
	return stats
}

func publish(ctx context.Context, js jetstream.JetStream, subj, body, id string) error {
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		m := nats.NewMsg(subj)
		m.Data = []byte(body)
		m.Header.Set(nats.MsgIdHdr, id)
		_, err := js.PublishMsg(pctx, m)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("publishing %s: %w", id, errors.Join(err, ctx.Err()))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// verify checks the invariants from the streams and the backend effects.
func (c *cluster) verify(env *testenv.Env, stats *loadStats) testenv.Counts {
	c.t.Helper()
	counts := env.CheckStreams()
	if counts.Duplicates != 0 || counts.Lost != 0 {
		c.t.Errorf("invariants broken: %s", counts)
	}
	if int64(counts.Accepted) != stats.accepted.Load() || int64(counts.Rejected) < stats.rejected.Load() {
		c.t.Errorf("stream counts %s disagree with the load: %s", counts, stats)
	}
	// No second backend effect: every successful result has exactly one
	// effect on the hypervisor, and no effect is without a result.
	want := map[string]int{}
	reasons := map[string]int{}
	for _, s := range env.AllEvents() {
		ev := s.Event
		if ev != nil && ev.Type == api.TypeRejected {
			reasons[ev.Reason]++
		}
		if ev != nil && ev.Type.IsResult() && ev.Type != api.TypeFailed {
			want[ev.VM+" "+string(ev.Action)]++
		}
	}
	got := c.effects()
	for k, n := range want {
		if got[k] != n {
			c.t.Errorf("backend effects for %q: %d, results say %d", k, got[k], n)
		}
	}
	for k, n := range got {
		if want[k] == 0 {
			c.t.Errorf("backend effects for %q: %d without a result", k, n)
		}
	}
	for r, n := range reasons {
		c.t.Logf("rejected %d× with reason %q", n, r)
	}
	env.CheckProjection(60 * time.Second)
	c.t.Logf("%s; %s", stats, counts)
	fmt.Printf("FAULT-TEST %s: %s; %s\n", c.t.Name(), stats, counts)
	return counts
}

// every runs fn at random moments in [min,max) until ctx ends. The pauses
// choose when faults strike; no result depends on them.
// atMost calls fn like every, but returns after n calls.
func atMost(ctx context.Context, n int, lo, hi time.Duration, fn func()) int {
	inner, cancel := context.WithCancel(ctx)
	defer cancel()
	done := 0
	return every(inner, lo, hi, func() {
		fn()
		if done++; done == n {
			cancel()
		}
	})
}

func every(ctx context.Context, lo, hi time.Duration, fn func()) int {
	n := 0
	for {
		d := lo + time.Duration(rand.Int64N(int64(hi-lo)))
		select {
		case <-ctx.Done():
			return n
		case <-time.After(d):
		}
		fn()
		n++
	}
}

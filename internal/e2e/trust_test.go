package e2e_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/datadir"
	"github.com/vmherd/vmherd/internal/images"
	"github.com/vmherd/vmherd/internal/relay"
	"github.com/vmherd/vmherd/internal/testenv"
)

// violations collects the server's asynchronous permission errors.
type violations struct {
	mu   sync.Mutex
	errs []string
}

func (v *violations) handler(_ *nats.Conn, _ *nats.Subscription, err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.errs = append(v.errs, err.Error())
}

// saw waits up to 5 s for a permission violation naming subject.
func (v *violations) saw(subject string) bool {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		v.mu.Lock()
		for _, e := range v.errs {
			if strings.Contains(e, "Permissions Violation") && strings.Contains(e, subject) {
				v.mu.Unlock()
				return true
			}
		}
		v.mu.Unlock()
	}
	return false
}

// connectAs connects with credentials issued for id by the engine's
// authority in dir.
func connectAs(t *testing.T, url, dir string, id auth.Identity) (*nats.Conn, jetstream.JetStream, *violations) {
	t.Helper()
	a, err := auth.Open(datadir.AuthDir(dir))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), id.Name()+".creds")
	if err := a.WriteCreds(path, id); err != nil {
		t.Fatal(err)
	}
	v := &violations{}
	opts := []nats.Option{nats.UserCredentials(path), nats.ErrorHandler(v.handler)}
	if p := id.InboxPrefix(); p != "" {
		opts = append(opts, nats.CustomInboxPrefix(p))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatalf("connecting as %s: %v", id.Name(), err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js, v
}

// authEngine starts the engine binary with its embedded server (auth on)
// and a Noop worker h1, and attaches with the admin credentials once h1
// heartbeats.
func authEngine(t *testing.T, args ...string) (url, dir string, env *testenv.Env) {
	t.Helper()
	return authEngineIn(t, filepath.Join(t.TempDir(), "data"), args...)
}

// authEngineIn is authEngine with the data directory dir.
func authEngineIn(t *testing.T, dir string, args ...string) (url, _ string, env *testenv.Env) {
	t.Helper()
	bin := testenv.Binaries(t)
	port := testenv.FreePort(t)
	url = "nats://" + testenv.Addr(port)
	eng := testenv.StartProc(t, "engine", filepath.Join(bin, "engine"), nil,
		append([]string{"--data-dir", dir, "--listen", testenv.Addr(port), "--with-worker", "--backends", "noop", "--host", "h1"}, args...)...)
	eng.WaitLog("engine serving", 60*time.Second)
	env = testenv.AttachCreds(t, url, datadir.AdminCreds(dir))
	env.WaitFor("worker h1 heartbeats", 30*time.Second, func() bool {
		kv, err := env.JS.KeyValue(context.Background(), env.Names.HostsBucket())
		if err != nil {
			return false
		}
		_, err = kv.Get(context.Background(), "h1")
		return err == nil
	})
	return url, dir, env
}

// The engine's embedded server admits only the credentials it signed, and
// each role can do only its part: a viewer reads but cannot command; a
// worker of h2 cannot take h1's tasks, cannot heartbeat as h1, cannot
// write events as h1, and what it writes about h1's VM changes nothing.
func TestTrustRoles(t *testing.T) {
	url, dir, env := authEngine(t)

	// Credentials files are the owner's only.
	for _, f := range []string{"admin.creds", "engine.creds", "worker-h1.creds", "account.nk", "operator.nk"} {
		st, err := os.Stat(filepath.Join(datadir.AuthDir(dir), f))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, mode %v; want 0600", f, err, st.Mode().Perm())
		}
	}

	// No credentials: refused.
	if nc, err := nats.Connect(url); err == nil {
		nc.Close()
		t.Fatal("an unauthenticated connection was accepted")
	} else if !strings.Contains(err.Error(), "Authorization Violation") {
		t.Fatalf("unauthenticated connect: %v", err)
	}

	env.SendCmd("web1", "prepare", "p1", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}})
	env.Result("web1", "p1", 30*time.Second)
	env.SendCmd("web1", "start", "s1", api.Command{})
	env.Result("web1", "s1", 30*time.Second)
	commands := func() uint64 {
		st, err := env.JS.Stream(context.Background(), env.Names.CommandsStream())
		if err != nil {
			t.Fatal(err)
		}
		info, err := st.Info(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return info.State.Msgs
	}

	// A viewer reads (vmctl list), and cannot command.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	vnc, vjs, vv := connectAs(t, url, dir, auth.Identity{Role: auth.RoleViewer, User: "dash"})
	if _, err := vjs.Stream(ctx, env.Names.EventsStream()); err != nil {
		t.Fatalf("a viewer cannot read the events stream: %v", err)
	}
	before := commands()
	if err := vnc.Publish(env.Names.Command("web1", "stop"), nil); err != nil {
		t.Fatal(err)
	}
	if !vv.saw(env.Names.Command("web1", "stop")) {
		t.Error("a viewer's command publish was not refused by the server")
	}
	if got := commands(); got != before {
		t.Errorf("VM_COMMANDS went from %d to %d messages after a viewer's publish", before, got)
	}
	// VM_SSH (generated private keys) is for operators and admins only.
	akv, err := env.JS.KeyValue(ctx, env.Names.SSHBucket())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := akv.Put(ctx, api.SSHKey("web1", 1, api.SSHPrivateKey), []byte("secret")); err != nil {
		t.Fatal(err)
	}
	readSSH := func(js jetstream.JetStream) error {
		c, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		kv, err := js.KeyValue(c, env.Names.SSHBucket())
		if err != nil {
			return err
		}
		_, err = kv.Get(c, api.SSHKey("web1", 1, api.SSHPrivateKey))
		return err
	}
	if readSSH(vjs) == nil {
		t.Error("a viewer could read a VM's generated private key")
	}
	// A viewer reads console logs, but may not attach to a console (it
	// could type) nor watch one.
	if err := relay.PrintLog(ctx, vnc, env.Names, "h1", "web1", io.Discard, -1, false); err == nil || !strings.Contains(err.Error(), "keeps no console log") {
		t.Errorf("a viewer's log request (noop VM: no log) got %v", err)
	}
	if err := vnc.Publish(env.Names.Console("h1", "web1", api.ConsoleAttach), nil); err != nil {
		t.Fatal(err)
	}
	if !vv.saw(env.Names.Console("h1", "web1", api.ConsoleAttach)) {
		t.Error("a viewer could ask to attach to a console")
	}
	if _, err := vnc.SubscribeSync(env.Names.Console("h1", "web1", api.ConsoleOut)); err != nil {
		t.Fatal(err)
	}
	if !vv.saw(env.Names.Console("h1", "web1", api.ConsoleOut)) {
		t.Error("a viewer could watch a console")
	}

	// A worker of h2.
	wnc, wjs, wv := connectAs(t, url, dir, auth.Identity{Role: auth.RoleWorker, Host: "h2"})
	short := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, 2*time.Second) }
	c1, cc1 := short()
	if _, err := wjs.Consumer(c1, env.Names.TasksStream(), env.Names.HostTaskConsumer("h1")); err == nil {
		t.Error("h2's worker could bind to h1's task consumer")
	}
	cc1()
	c2, cc2 := short()
	if _, err := wjs.CreateOrUpdateConsumer(c2, env.Names.TasksStream(), jetstream.ConsumerConfig{
		Durable: "steal", FilterSubject: env.Names.HostTasks("h1"), AckPolicy: jetstream.AckExplicitPolicy,
	}); err == nil {
		t.Error("h2's worker could create a consumer of h1's tasks")
	}
	cc2()
	if !wv.saw("$JS.API.CONSUMER.CREATE." + env.Names.TasksStream()) {
		t.Error("no permission violation for h2's consumer on VM_TASKS")
	}
	c3, cc3 := short()
	kv, err := wjs.KeyValue(c3, env.Names.HostsBucket())
	if err == nil {
		_, err = kv.Put(c3, "h1", []byte(`{"host":"h1"}`))
	}
	cc3()
	if err == nil {
		t.Error("h2's worker could heartbeat as h1")
	}
	if err := wnc.Publish(env.Names.Event("web1", api.TypeStopped, "h1"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	if !wv.saw(env.Names.Event("web1", api.TypeStopped, "h1")) {
		t.Error("h2's worker could publish an event as h1")
	}
	if readSSH(wjs) == nil {
		t.Error("a worker could read a VM's generated private key")
	}
	// h2's worker cannot relay h1's consoles or tunnels.
	if _, err := wnc.SubscribeSync(env.Names.Console("h1", "*", api.ConsoleAttach)); err != nil {
		t.Fatal(err)
	}
	if !wv.saw(env.Names.Console("h1", "*", api.ConsoleAttach)) {
		t.Error("h2's worker could take h1's console attach requests")
	}
	if err := wnc.Publish(env.Names.Console("h1", "web1", api.ConsoleOut), []byte("forged output")); err != nil {
		t.Fatal(err)
	}
	if !wv.saw(env.Names.Console("h1", "web1", api.ConsoleOut)) {
		t.Error("h2's worker could publish console output for h1's VM")
	}
	if _, err := wnc.SubscribeSync(env.Names.Tunnel("h1", "*", "*", api.TunnelOpen)); err != nil {
		t.Fatal(err)
	}
	if !wv.saw(env.Names.Tunnel("h1", "*", "*", api.TunnelOpen)) {
		t.Error("h2's worker could take h1's tunnel requests")
	}
	if _, err := wnc.SubscribeSync("_INBOX.>"); err != nil {
		t.Fatal(err)
	}
	if !wv.saw("_INBOX.>") {
		t.Error("h2's worker could subscribe to every inbox")
	}
	// A forged result about h1's VM, on h2's own writer token: stored,
	// and changes nothing.
	forged := api.Event{Type: api.TypeStopped, VM: "web1", CommandID: "s1", Action: "start", Time: time.Now().UTC(),
		Host: "h1", State: api.StateStopped, Handle: &api.VmHandle{ID: "forged", Name: "web1"}}
	c4, cc4 := short()
	if _, err := wjs.Publish(c4, env.Names.Event("web1", api.TypeStopped, "h2"), forged.Encode()); err != nil {
		t.Fatalf("h2's worker cannot write on its own writer token: %v", err)
	}
	cc4()
	env.SendCmd("web1", "suspend", "after-forgery", api.Command{})
	if ev := env.Result("web1", "after-forgery", 30*time.Second); ev.Type != api.TypeSuspended {
		t.Fatalf("after the forged result web1 could not be suspended: %+v", ev)
	}
	env.CheckProjection(30 * time.Second)
	kvr, _ := env.JS.KeyValue(ctx, env.Names.RecordsBucket())
	e, err := kvr.Get(ctx, "web1")
	if err != nil || strings.Contains(string(e.Value()), "forged") {
		t.Fatalf("web1's record after the forgery: %v %s", err, e.Value())
	}

	// An operator commands, with its own name as the issuer token, and
	// only so: without it, or as someone else, the server refuses.
	onc, ojs, ov := connectAs(t, url, dir, auth.Identity{Role: auth.RoleOperator, User: "alice"})
	for _, subj := range []string{env.Names.Command("web1", "resume"), env.Names.IssuedCommand("web1", "resume", "bob")} {
		if err := onc.Publish(subj, []byte(`{"command_id":"not-alice"}`)); err != nil {
			t.Fatal(err)
		}
		if !ov.saw(subj) {
			t.Errorf("the operator alice could publish %s", subj)
		}
	}
	c5, cc5 := short()
	if _, err := ojs.Publish(c5, env.Names.IssuedCommand("web1", "resume", "alice"), []byte(`{"command_id":"by-alice"}`)); err != nil {
		t.Fatalf("an operator cannot command: %v", err)
	}
	cc5()
	if ev := env.Result("web1", "by-alice", 30*time.Second); ev.Type != api.TypeResumed {
		t.Fatalf("the operator's resume: %+v", ev)
	}
	if ev := env.Decision("web1", "by-alice", time.Second); ev.Issuer != "alice" {
		t.Errorf("the decision of alice's command names issuer %q", ev.Issuer)
	}
	if n := env.CountType("web1", api.TypeRejected); n != 0 {
		t.Errorf("web1 has %d rejections; the refused publishes reached the engine", n)
	}
	_, ojs2, _ := connectAs(t, url, dir, auth.Identity{Role: auth.RoleOperator, User: "carol"})
	if err := readSSH(ojs2); err != nil {
		t.Errorf("an operator cannot read VM_SSH: %v", err)
	}
	// An operator may attach to consoles: h1's worker answers (a noop VM
	// has no console, which it says).
	_, err = relay.AttachConsole(ctx, onc, env.Names, "h1", "web1")
	var re *relay.ReplyError
	if !errors.As(err, &re) || re.Code != "409" {
		t.Errorf("an operator's console attach to a noop VM: %v (want the worker's 409: no console)", err)
	}
}

// A flood of bad commands from one identity does not hold up another's:
// over its rate (here 20/s, bursts of 50) the flooder's commands are each
// rejected once, without reading state or queueing behind the VM's other
// commands, while alice's lifecycle goes through at its usual pace.
func TestTrustFloodFairness(t *testing.T) {
	url, dir, env := authEngine(t, "--command-rate", "20", "--command-burst", "50")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	_, fjs, _ := connectAs(t, url, dir, auth.Identity{Role: auth.RoleOperator, User: "flood"})
	_, ajs, _ := connectAs(t, url, dir, auth.Identity{Role: auth.RoleOperator, User: "alice"})

	// The flood: bad commands (unknown field), all on one VM name, so
	// that decided one by one they would fill the engine's window.
	const flood = 4000
	// What storing the flood costs this server now, the yardstick of
	// alice's wait: as many messages of the flood's size, published at
	// full speed to a scratch stream (its sync setting is the engine's).
	storeFlood := timeToStore(ctx, t, env.JS, flood, len(`{"command_id":"f1000","bogus":true}`))
	started := make(chan struct{})
	floodDone := make(chan error, 1)
	floodT0 := time.Now()
	go func() {
		for i := range flood {
			if i == flood/4 {
				close(started)
			}
			body := fmt.Sprintf(`{"command_id":"f%d","bogus":true}`, i)
			if _, err := fjs.PublishAsync(env.Names.IssuedCommand("victim", "start", "flood"), []byte(body)); err != nil {
				floodDone <- err
				return
			}
		}
		select {
		case <-fjs.PublishAsyncComplete():
			floodDone <- nil
		case <-ctx.Done():
			floodDone <- ctx.Err()
		}
	}()
	<-started

	// Alice's lifecycle meanwhile: each decision timed from its stored publish.
	worst := aliceLifecycle(ctx, t, env, ajs, 30*time.Second, nil)
	if err := <-floodDone; err != nil {
		t.Fatalf("flooding: %v", err)
	}

	// Every flood command: exactly one rejection, most for the rate.
	var limited, bad int
	env.WaitFor("a rejection of every flood command", 2*time.Minute, func() bool {
		limited, bad = 0, 0
		seen := map[string]int{}
		for _, s := range env.Events("victim") {
			if s.Event == nil || s.Event.Type != api.TypeRejected || s.Event.Issuer != "flood" {
				continue
			}
			seen[s.Event.CommandID]++
			if strings.HasPrefix(s.Event.Reason, "rate limit:") {
				limited++
			} else {
				bad++
			}
		}
		for id, n := range seen {
			if n != 1 {
				t.Fatalf("flood command %s has %d rejections", id, n)
			}
		}
		return len(seen) == flood
	})
	elapsed := time.Since(floodT0)
	t.Logf("flood of %d: %d rejected for the rate, %d for the body; alice's slowest decision during it: %v (storing %d messages took %v)", flood, limited, bad, worst, flood, storeFlood)
	// The flooder got no more decided than its burst and rate allow
	// (the rest were rejected for the rate).
	if allowed := 50 + int(20*elapsed.Seconds()) + 1; bad > allowed {
		t.Errorf("%d flood commands were decided on their merits in %v; the limit allows %d", bad, elapsed, allowed)
	}
	// Without the limit's cheap path the flood, decided one command at a
	// time on its VM, held alice's first decision for about 7 s here (race
	// build, 2 cores, storing 4,000 messages took about 1.1-1.5 s); with it,
	// about 2-3 s: the time the server takes to store the flood's
	// rejections ahead of her command. The bound scales with what storing
	// costs on this machine at this moment (a loaded CI runner is slower
	// at both).
	if bound := 3*storeFlood + 2*time.Second; worst > bound {
		t.Errorf("alice's slowest decision during the flood took %v (want < %v: 3 x %v to store %d messages, + 2s)", worst, bound, storeFlood, flood)
	}
	if n := env.CountType("a1", api.TypeRejected); n != 0 {
		t.Errorf("alice had %d commands rejected", n)
	}
}

// timeToStore publishes n messages of size bytes to a scratch stream at
// full speed (async, every ack awaited) and returns how long they took.
// aliceLifecycle runs operator alice's VM a1 through prepare, start,
// stop, start and destroy, each command published with her issuer token
// and expected accepted within timeout (and its result within timeout),
// calling each (if set) before each command; it returns her slowest
// decision, timed from the publish.
func aliceLifecycle(ctx context.Context, t *testing.T, env *testenv.Env, ajs jetstream.JetStream, timeout time.Duration, each func()) time.Duration {
	t.Helper()
	var worst time.Duration
	for i, action := range []string{"prepare", "start", "stop", "start", "destroy"} {
		if each != nil {
			each()
		}
		id := fmt.Sprintf("a-%d-%s", i, action)
		body := fmt.Sprintf(`{"command_id":%q}`, id)
		if action == "prepare" {
			body = fmt.Sprintf(`{"command_id":%q,"spec":{"backend":"noop"}}`, id)
		}
		t0 := time.Now()
		if _, err := ajs.Publish(ctx, env.Names.IssuedCommand("a1", action, "alice"), []byte(body)); err != nil {
			t.Fatalf("alice's %s during the flood: %v", action, err)
		}
		ev := env.Decision("a1", id, timeout)
		worst = max(worst, time.Since(t0))
		if ev.Type != api.TypeAccepted {
			t.Fatalf("alice's %s during the flood: %+v", action, ev)
		}
		env.Result("a1", id, timeout)
	}
	return worst
}

func timeToStore(ctx context.Context, t *testing.T, js jetstream.JetStream, n, size int) time.Duration {
	t.Helper()
	const name, subj = "SCRATCH_STORE", "scratch.store"
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{subj}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = js.DeleteStream(context.WithoutCancel(ctx), name) }()
	body := make([]byte, size)
	t0 := time.Now()
	for range n {
		if _, err := js.PublishAsync(subj, body); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	return time.Since(t0)
}

// A viewer makes the server deliver stored messages to a worker's service
// (issue 26 item 2): a push consumer of VM_IMAGES delivering to
// vm.image.h1.rm in its queue group, and a direct get of h1's image status
// answered on vm.image.h1.rm. Each delivers {"name":"tiny",...}, an image
// removal the viewer could not send itself. The worker takes only
// requests with an inbox reply and no relay marks: the image stays.
func TestTrustRelayedRequests(t *testing.T) {
	blob := make([]byte, 1<<20) // a raw disk of 1 MiB, the smallest image a pull takes
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(blob) }))
	defer srv.Close()
	dir := filepath.Join(t.TempDir(), "data")
	// The test's image server is on loopback, which pulls refuse unless allowed.
	store := &images.Store{Root: filepath.Join(dir, "images"), Policy: images.Policy{AllowPrivate: true}}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := store.Pull(ctx, srv.URL+"/tiny.img", images.PullOptions{Name: "tiny"}); err != nil {
		t.Fatal(err)
	}
	url, _, env := authEngineIn(t, dir)
	key := api.ImageKey("h1", "tiny")
	env.WaitFor("h1 reports its image", 30*time.Second, func() bool {
		kv, err := env.JS.KeyValue(ctx, env.Names.ImagesBucket())
		if err != nil {
			return false
		}
		_, err = kv.Get(ctx, key)
		return err == nil
	})
	vnc, _, _ := connectAs(t, url, dir, auth.Identity{Role: auth.RoleViewer, User: "dash"})
	rm := env.Names.Image("h1", api.ImageRemove)
	body := fmt.Sprintf(`{"stream_name":"KV_%s","config":{"name":"rm","deliver_subject":%q,"deliver_group":"q","filter_subject":"$KV.%s.%s","ack_policy":"none"}}`,
		env.Names.ImagesBucket(), rm, env.Names.ImagesBucket(), key)
	if err := vnc.PublishRequest("$JS.API.CONSUMER.CREATE.KV_"+env.Names.ImagesBucket()+".rm.$KV."+env.Names.ImagesBucket()+"."+key, vnc.NewInbox(), []byte(body)); err != nil {
		t.Fatal(err)
	}
	if err := vnc.PublishRequest("$JS.API.DIRECT.GET.KV_"+env.Names.ImagesBucket()+".$KV."+env.Names.ImagesBucket()+"."+key, rm, nil); err != nil {
		t.Fatal(err)
	}
	_ = vnc.Flush()
	time.Sleep(3 * time.Second)
	if _, err := store.Get("tiny"); err != nil {
		t.Errorf("h1's image was removed by what the server relayed for a viewer: %v", err)
	}
}

package client_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/natsserver"
)

func connect(t *testing.T, o client.Options) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Connect(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// Commands carry the operator's name as their issuer token, read from its
// credentials, and a retried send of the same command id is done once.
func TestSendIdempotent(t *testing.T) {
	c := connect(t, client.OptionsFromEnv())
	if c.Issuer() != "ci" {
		t.Fatalf("issuer %q, want ci (the credentials' name)", c.Issuer())
	}
	ctx := ctxT(t, time.Minute)
	spec := api.VmSpec{Name: "idem1"}
	first, err := c.Send(ctx, "idem1", api.ActPrepare, api.Command{CommandID: "same", Spec: &spec})
	if err != nil {
		t.Fatal(err)
	}
	again, err := c.Send(ctx, "idem1", api.ActPrepare, api.Command{CommandID: "same", Spec: &spec})
	if err != nil {
		t.Fatal(err)
	}
	if !again.Duplicate || again.Seq != first.Seq {
		t.Fatalf("second send of the same id: seq %d duplicate %v, want seq %d duplicate", again.Seq, again.Duplicate, first.Seq)
	}
	res, err := c.Wait(ctx, first)
	if err != nil {
		t.Fatal(err)
	}
	if res.Final.Type != api.TypePrepared || res.Decision.Issuer != "ci" || res.Record == nil || res.Record.State != api.StatePrepared {
		t.Fatalf("result %+v decision %+v record %+v", res.Final, res.Decision, res.Record)
	}
	hist, err := c.History(ctx, "idem1")
	if err != nil {
		t.Fatal(err)
	}
	accepted := 0
	for _, st := range hist {
		if st.Event.Type == api.TypeAccepted {
			accepted++
		}
	}
	if accepted != 1 {
		t.Fatalf("%d accepted events for one command sent twice, want 1: %+v", accepted, hist)
	}
	if _, err := c.Destroy(ctx, "idem1"); err != nil {
		t.Fatal(err)
	}
}

// Errors are typed: callers branch with errors.Is and errors.As.
func TestTypedErrors(t *testing.T) {
	c := connect(t, client.OptionsFromEnv())
	ctx := ctxT(t, time.Minute)

	_, err := c.Start(ctx, "nosuch")
	var rej *client.RejectedError
	if !errors.As(err, &rej) || !errors.Is(err, client.ErrNotFound) || rej.Action != api.ActStart || rej.Reason == "" {
		t.Fatalf("start of a VM that never existed: %v", err)
	}
	if _, err := c.Record(ctx, "nosuch"); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("record of a VM that never existed: %v", err)
	}
	if _, err := c.Create(ctx, api.VmSpec{Name: "typed1"}); err != nil {
		t.Fatal(err)
	}
	defer c.Destroy(ctx, "typed1")
	if _, err := c.Create(ctx, api.VmSpec{Name: "typed1"}); !errors.As(err, &rej) || errors.Is(err, client.ErrNotFound) {
		t.Fatalf("create of an existing VM: %v, want a rejection that is not ErrNotFound", err)
	}
	if err := rej.Event; err == nil || rej.Event.Type != api.TypeRejected {
		t.Fatalf("rejection without its event: %+v", rej)
	}

	// A command that is never decided: the wait ends with a TimeoutError
	// that says it is stored.
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	_, err = c.Wait(short, &client.Sent{VM: "typed1", Action: api.ActStop, CommandID: "never-sent", From: 1})
	var te *client.TimeoutError
	if !errors.As(err, &te) || !errors.Is(err, client.ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) || te.Accepted {
		t.Fatalf("wait for a command never sent: %v", err)
	}

	// Another installation's prefix: no engine has run there.
	other := connect(t, client.Options{URL: engineURL, Creds: adminCreds, Prefix: "other"})
	_, err = other.Start(ctx, "typed1")
	var ne *client.NoEngineError
	if !errors.As(err, &ne) || !errors.Is(err, client.ErrNoEngine) || ne.Stored {
		t.Fatalf("start with no engine: %v", err)
	}

	// An issuer token that is not the identity's: the server refuses it.
	nc, err := nats.Connect(engineURL, nats.UserCredentials(opCreds), nats.CustomInboxPrefix("_INBOX_VMHERD.operator.ci"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	forged, err := client.New(nc, "", "mallory")
	if err != nil {
		t.Fatal(err)
	}
	_, err = forged.Send(ctx, "typed1", api.ActStop, api.Command{})
	if !errors.Is(err, client.ErrNotAllowed) {
		t.Fatalf("send as another issuer: %v, want ErrNotAllowed", err)
	}

	// Live queries and relays reach the worker; the Noop backend has no
	// console and no guest, and the worker says so.
	if _, err := c.Start(ctx, "typed1"); err != nil {
		t.Fatal(err)
	}
	st, err := c.State(ctx, "typed1")
	if err != nil || st.State != api.StateRunning || st.Host != "local" {
		t.Fatalf("state: %+v %v", st, err)
	}
	var we *client.WorkerError
	if _, err := c.DialGuest(ctx, "typed1", 22); !errors.As(err, &we) || we.Host != "local" || we.Code == "" {
		t.Fatalf("tunnel to a Noop guest: %v, want a worker's refusal", err)
	}
	if _, err := c.DialGuest(ctx, "typed1", 70000); err == nil {
		t.Fatal("tunnel to port 70000 was not refused")
	}
}

// Progress reports the decision, then the accepted host.
func TestProgress(t *testing.T) {
	c := connect(t, client.OptionsFromEnv())
	ctx := ctxT(t, time.Minute)
	var mu sync.Mutex
	var seen []string
	_, err := c.Create(ctx, api.VmSpec{Name: "prog1"}, client.WithProgress(func(p client.Progress) {
		mu.Lock()
		defer mu.Unlock()
		if len(seen) == 0 || seen[len(seen)-1] != p.Waiting+"@"+p.Host {
			seen = append(seen, p.Waiting+"@"+p.Host)
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Destroy(ctx, "prog1")
	mu.Lock()
	defer mu.Unlock()
	if len(seen) < 2 || seen[0] != "decision@" || seen[1] != "result@local" {
		t.Fatalf("progress %v, want decision then result on local", seen)
	}
}

// The events iterator keeps its place across a NATS server's restart:
// events stored before it, right after it (before the watcher's
// connection is back) and later are each yielded once, in order.
func TestWatchAcrossServerRestart(t *testing.T) {
	dir := t.TempDir()
	port := freePort(t)
	listen := "127.0.0.1:" + strconv.Itoa(port)
	start := func() *natsserver.Server {
		s, err := natsserver.Start(natsserver.Options{Listen: listen, StoreDir: dir, Sync: "always"})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	srv := start()
	defer func() { srv.Stop() }()
	url := "nats://" + listen
	writer := func() (*events.Store, *nats.Conn) {
		nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		js, _ := jetstreamNew(t, nc)
		ctx := ctxT(t, 30*time.Second)
		if err := jsetup.Ensure(ctx, js, api.DefaultNames, jsetup.DefaultSettings); err != nil {
			t.Fatal(err)
		}
		st, err := events.NewStore(ctx, js, api.DefaultNames, api.EngineWriter)
		if err != nil {
			t.Fatal(err)
		}
		return st, nc
	}
	store, _ := writer()
	n := 0
	put := func(s *events.Store, count int) {
		for range count {
			n++
			vmName := "w" + strconv.Itoa(n%3)
			ev := &api.Event{Type: api.TypeRejected, VM: vmName, CommandID: "c" + strconv.Itoa(n), Action: api.ActStart, Time: time.Now(), Reason: "test"}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if _, _, err := s.Append(ctx, ev, events.NoExpect, fmt.Sprintf("watch/%d", n)); err != nil {
				cancel()
				t.Fatalf("append %d: %v", n, err)
			}
			cancel()
		}
	}
	put(store, 50) // before the watch starts: History reads them

	c := connect(t, client.Options{URL: url, NATSOptions: []nats.Option{nats.ReconnectWait(50 * time.Millisecond)}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type got struct {
		all []uint64
		vm  []uint64
	}
	var mu sync.Mutex
	var g got
	watch := func(o client.WatchOptions, into *[]uint64) {
		for st, err := range c.Watch(ctx, o) {
			if err != nil {
				t.Errorf("watch %+v: %v", o, err)
				return
			}
			mu.Lock()
			*into = append(*into, st.Seq)
			mu.Unlock()
		}
	}
	go watch(client.WatchOptions{History: true}, &g.all)
	go watch(client.WatchOptions{VM: "w1", History: true}, &g.vm)
	put(store, 50) // while it watches

	srv.Stop()
	time.Sleep(500 * time.Millisecond) // the watcher's reads fail meanwhile
	srv = start()
	store2, _ := writer()
	put(store2, 50) // at once, before the watcher's connection is back
	put(store2, 50) // and later
	want := n
	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		done := len(g.all) >= want
		mu.Unlock()
		if done || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // anything extra would come now
	cancel()
	mu.Lock()
	defer mu.Unlock()
	if len(g.all) != want {
		t.Fatalf("watched %d events, want %d", len(g.all), want)
	}
	for i, s := range g.all {
		if s != uint64(i+1) {
			t.Fatalf("event %d has seq %d: a gap or a repeat (%v)", i, s, g.all)
		}
	}
	wantVM := 0
	for i := 1; i <= want; i++ {
		if i%3 == 1 {
			wantVM++
		}
	}
	if len(g.vm) != wantVM {
		t.Fatalf("watched %d events of w1, want %d", len(g.vm), wantVM)
	}
	for i := 1; i < len(g.vm); i++ {
		if g.vm[i] <= g.vm[i-1] {
			t.Fatalf("w1's events out of order or repeated: %v", g.vm)
		}
	}
	t.Logf("watched %d events (%d of w1) across a server restart; none missed, none twice", len(g.all), len(g.vm))
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func jetstreamNew(t *testing.T, nc *nats.Conn) (jetstream.JetStream, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js, nil
}

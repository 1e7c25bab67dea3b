package events_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/natsserver"
)

// FollowVM delivers one VM's events in order from a sequence on, those
// stored while it follows included, makes no consumer, and ends when its
// function says so or its context ends.
func TestFollowVM(t *testing.T) {
	ns, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", StoreDir: t.TempDir() + "/js", Sync: "default"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Stop)
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx := context.Background()
	n := api.DefaultNames
	if err := jsetup.Ensure(ctx, js, n, jsetup.DefaultSettings); err != nil {
		t.Fatal(err)
	}
	st, err := events.NewStore(ctx, js, n, api.EngineWriter)
	if err != nil {
		t.Fatal(err)
	}
	appendEv := func(vmName, id string) uint64 {
		t.Helper()
		seq, _, err := st.Append(ctx, &api.Event{VM: vmName, Type: api.TypeAccepted, Action: fsm.ActPrepare, CommandID: id, Time: time.Now()}, events.NoExpect, "")
		if err != nil {
			t.Fatal(err)
		}
		return seq
	}
	appendEv("a", "a1")
	from := appendEv("a", "a2")
	appendEv("b", "b1") // another VM's: not delivered
	go func() {
		time.Sleep(50 * time.Millisecond)
		appendEv("a", "a3") // stored while it follows
	}()
	var got []string
	err = st.FollowVM(ctx, "a", from, func(s events.Stored) bool {
		got = append(got, s.Event.CommandID)
		return len(got) < 2
	})
	if err != nil || len(got) != 2 || got[0] != "a2" || got[1] != "a3" {
		t.Fatalf("FollowVM from %d = %v, %v; want [a2 a3]", from, got, err)
	}
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := st.FollowVM(cctx, "c", 1, func(events.Stored) bool { return true }); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("FollowVM of a VM without events until the deadline: %v", err)
	}
	info, err := st.Stream().Info(ctx)
	if err != nil || info.State.Consumers != 0 {
		t.Fatalf("consumers after following: %v, %v", info.State.Consumers, err)
	}
}

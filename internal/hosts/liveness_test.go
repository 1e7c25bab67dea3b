package hosts

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
)

// entry is a VM_HOSTS entry as the watch (or a direct get) delivers it.
type entry struct {
	key     string
	value   []byte
	rev     uint64
	created time.Time
	op      jetstream.KeyValueOp
}

func (e entry) Bucket() string                  { return "VM_HOSTS" }
func (e entry) Key() string                     { return e.key }
func (e entry) Value() []byte                   { return e.value }
func (e entry) Revision() uint64                { return e.rev }
func (e entry) Created() time.Time              { return e.created }
func (e entry) Delta() uint64                   { return 0 }
func (e entry) Operation() jetstream.KeyValueOp { return e.op }

func beatEntry(host string, rev uint64, age time.Duration) entry {
	b, _ := json.Marshal(api.Heartbeat{Host: host, Capacity: api.Resources{Vcpus: 4, MemoryMB: 4096}})
	return entry{key: host, value: b, rev: rev, created: time.Now().Add(-age), op: jetstream.KeyValuePut}
}

func cordonEntry(host string, rev uint64, put bool) entry {
	e := entry{key: api.CordonKey(host), rev: rev, created: time.Now(), op: jetstream.KeyValueDelete}
	if put {
		e.op = jetstream.KeyValuePut
		e.value, _ = json.Marshal(api.Cordon{Time: time.Now(), Reason: "maintenance"})
	}
	return e
}

// A host is alive while the server stored its last heartbeat less than
// LostAfter ago (whatever time the worker wrote in it), lost after;
// a cordon adds ",cordoned" while its key exists; a host never heard
// from, or forgotten, is nil.
func TestLiveness(t *testing.T) {
	t.Parallel()
	const lostAfter = 10 * time.Second
	for _, tc := range []struct {
		name    string
		entries []entry
		want    string // Status(); "" for nil
	}{
		{"fresh beat", []entry{beatEntry("h1", 1, 0)}, "alive"},
		{"beat just under the limit", []entry{beatEntry("h1", 1, lostAfter-time.Second)}, "alive"},
		{"beat just over the limit", []entry{beatEntry("h1", 1, lostAfter+time.Second)}, "lost"},
		{"old beat", []entry{beatEntry("h1", 1, time.Hour)}, "lost"},
		{"old beat, then a fresh one", []entry{beatEntry("h1", 1, time.Hour), beatEntry("h1", 2, 0)}, "alive"},
		{"an older revision delivered late", []entry{beatEntry("h1", 2, time.Hour), beatEntry("h1", 1, 0)}, "lost"},
		{"cordoned", []entry{beatEntry("h1", 1, 0), cordonEntry("h1", 2, true)}, "alive,cordoned"},
		{"cordoned and lost", []entry{beatEntry("h1", 1, time.Hour), cordonEntry("h1", 2, true)}, "lost,cordoned"},
		{"cordon before the first beat", []entry{cordonEntry("h1", 1, true), beatEntry("h1", 2, 0)}, "alive,cordoned"},
		{"uncordoned", []entry{beatEntry("h1", 1, 0), cordonEntry("h1", 2, true), cordonEntry("h1", 3, false)}, "alive"},
		{"a stale uncordon is ignored", []entry{beatEntry("h1", 1, 0), cordonEntry("h1", 3, true), cordonEntry("h1", 2, false)}, "alive,cordoned"},
		{"cordon only: no host", []entry{cordonEntry("h1", 1, true)}, ""},
		{"forgotten", []entry{beatEntry("h1", 1, 0), {key: "h1", rev: 2, op: jetstream.KeyValueDelete}}, ""},
		{"forgotten, then back", []entry{beatEntry("h1", 1, 0), {key: "h1", rev: 2, op: jetstream.KeyValueDelete}, beatEntry("h1", 3, 0)}, "alive"},
		{"a body naming another host", []entry{{key: "h1", value: []byte(`{"host":"h2"}`), rev: 1, created: time.Now(), op: jetstream.KeyValuePut}}, ""},
		{"an undecodable body", []entry{{key: "h1", value: []byte(`{`), rev: 1, created: time.Now(), op: jetstream.KeyValuePut}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewRegistry(lostAfter)
			for _, e := range tc.entries {
				r.apply(e)
			}
			h := r.Get("h1")
			got := ""
			if h != nil {
				got = h.Status()
			}
			if got != tc.want {
				t.Fatalf("h1 is %q, want %q", got, tc.want)
			}
			if h != nil && h.Alive != (got == "alive" || got == "alive,cordoned") {
				t.Fatalf("Alive %v with status %s", h.Alive, got)
			}
			if listed := len(r.List()); listed != map[bool]int{true: 1, false: 0}[h != nil] {
				t.Fatalf("List has %d hosts, Get says %v", listed, h)
			}
			if h != nil && (h.Capacity != api.Resources{Vcpus: 4, MemoryMB: 4096}) {
				t.Fatalf("capacity %+v", h.Capacity)
			}
			if h != nil && (Placement{}).Fits(h) == "" && !h.Alive {
				t.Fatal("a lost host fits a placement")
			}
		})
	}
}

// Liveness is judged when asked, not when the beat arrived: a host alive
// a moment ago reads lost once LostAfter has passed without a beat.
func TestLivenessAges(t *testing.T) {
	t.Parallel()
	r := NewRegistry(200 * time.Millisecond)
	r.apply(beatEntry("h1", 1, 0))
	if !r.Alive("h1") {
		t.Fatal("h1 not alive right after its beat")
	}
	time.Sleep(250 * time.Millisecond)
	if r.Alive("h1") {
		t.Fatal("h1 still alive 250ms after its last beat (lost after 200ms)")
	}
	if r.Alive("h9") {
		t.Fatal("a host never heard from is alive")
	}
}

// kvGets is a VM_HOSTS bucket that answers direct gets from a table and
// counts them; nothing else of jetstream.KeyValue is used.
type kvGets struct {
	jetstream.KeyValue
	mu      sync.Mutex
	entries map[string]entry
	gets    int
}

func (k *kvGets) Get(_ context.Context, key string) (jetstream.KeyValueEntry, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.gets++
	e, ok := k.entries[key]
	if !ok {
		return nil, jetstream.ErrKeyNotFound
	}
	return e, nil
}

func (k *kvGets) count() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.gets
}

// Get and Alive read memory only (the engine's admission calls them
// and does no I/O): a host that looks lost is not read from the bucket
// on the caller's path. The registry's own loss check reads it (the
// watch may lag), so a host whose beats the watch has not delivered is
// not reported lost, and one really lost is reported once, then back.
func TestGetDoesNoIOAndLossIsChecked(t *testing.T) {
	t.Parallel()
	r := NewRegistry(time.Second)
	kv := &kvGets{entries: map[string]entry{
		"h1": beatEntry("h1", 5, 0),         // beats the watch has not delivered
		"h2": beatEntry("h2", 2, time.Hour), // really lost
	}}
	r.kv = kv
	r.apply(beatEntry("h1", 1, time.Hour))
	r.apply(beatEntry("h2", 2, time.Hour))
	r.loaded = true

	for range 3 {
		if r.Alive("h1") || r.Get("h2").Alive || r.Get("h3") != nil {
			t.Fatal("memory changed without the watch or the loss check")
		}
	}
	if n := kv.count(); n != 0 {
		t.Fatalf("Get and Alive read the bucket %d times", n)
	}

	r.checkLostOnce(context.Background())
	if kv.count() != 2 {
		t.Fatalf("the loss check read %d entries, want the 2 hosts that looked lost", kv.count())
	}
	if !r.Alive("h1") {
		t.Fatal("h1 beats (read directly) but is not alive")
	}
	if r.Alive("h2") {
		t.Fatal("h2 alive")
	}
	changes := drain(r)
	if len(changes) != 1 || changes[0].Kind != api.HostLost || changes[0].Host != "h2" || changes[0].Rev != 2 {
		t.Fatalf("changes %+v, want h2 lost at rev 2", changes)
	}

	r.checkLostOnce(context.Background())
	if c := drain(r); len(c) != 0 {
		t.Fatalf("a loss reported twice: %+v", c)
	}

	kv.mu.Lock()
	kv.entries["h2"] = beatEntry("h2", 7, 0)
	kv.mu.Unlock()
	r.checkLostOnce(context.Background())
	if c := drain(r); len(c) != 1 || c[0].Kind != api.HostBack || c[0].Host != "h2" || c[0].Rev != 7 {
		t.Fatalf("changes %+v, want h2 back at rev 7", c)
	}
	if !r.Alive("h2") {
		t.Fatal("h2 back but not alive")
	}
}

func drain(r *Registry) []Change {
	var out []Change
	for {
		select {
		case c := <-r.Changes():
			out = append(out, c)
		default:
			return out
		}
	}
}

package hosts_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/natsserver"
)

func bucket(t *testing.T) (jetstream.JetStream, jetstream.KeyValue) {
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
	js, _ := jetstream.New(nc)
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "VM_HOSTS"})
	if err != nil {
		t.Fatal(err)
	}
	return js, kv
}

func beat(t *testing.T, kv jetstream.KeyValue, key string, hb api.Heartbeat) {
	t.Helper()
	b, _ := json.Marshal(hb)
	if _, err := kv.Put(context.Background(), key, b); err != nil {
		t.Fatal(err)
	}
}

// A heartbeat speaks for the host its key names (the key is what the
// server's permissions pin), never for the host its body names: the worker
// of h2, putting its own key with "host":"h1" and a huge capacity, does not
// get a 200-vCPU VM placed on h1 (trust-holes issue, item 4).
func TestHeartbeatIdentityIsTheKey(t *testing.T) {
	js, kv := bucket(t)
	beat(t, kv, "h1", api.Heartbeat{Host: "h1", Backends: []api.BackendTag{api.BackendQEMU}, DefaultBackend: api.BackendQEMU,
		Capacity: api.Resources{Vcpus: 8, MemoryMB: 16384}})
	beat(t, kv, "h2", api.Heartbeat{Host: "h1", Backends: []api.BackendTag{api.BackendQEMU}, DefaultBackend: api.BackendQEMU,
		Capacity: api.Resources{Vcpus: 400, MemoryMB: 1 << 20}})
	// A body naming no host: not a worker's heartbeat (e.g. a JetStream
	// API answer the server was made to publish on the key).
	if _, err := kv.Put(context.Background(), "h3", []byte(`{"type":"io.nats.jetstream.api.v1.account_info_response","memory":0}`)); err != nil {
		t.Fatal(err)
	}
	// A key that is no host id: no worker could have written it.
	beat(t, kv, "no.host", api.Heartbeat{Host: "no.host", Capacity: api.Resources{Vcpus: 400, MemoryMB: 1 << 20}})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, list := range []func() ([]*api.Host, error){
		func() ([]*api.Host, error) { return hosts.Snapshot(ctx, js, "VM_HOSTS", time.Minute) },
		func() ([]*api.Host, error) {
			r := hosts.NewRegistry(time.Minute)
			go func() { _ = r.Run(ctx, kv) }()
			<-r.Ready()
			return r.List(), nil
		},
	} {
		hs, err := list()
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range hs {
			if h.Host == "h3" {
				t.Errorf("h3's entry, which names no host, was taken as a heartbeat: %+v", h.Heartbeat)
			}
			if h.Host == "h1" && h.Capacity.Vcpus != 8 {
				t.Errorf("h1 has %d vCPUs: another host's heartbeat spoke for it", h.Capacity.Vcpus)
			}
			if h.Host != "h1" && h.Capacity.Vcpus == 400 {
				t.Errorf("key %s: a heartbeat that is not its own host's was taken: %+v", h.Host, h.Heartbeat)
			}
		}
		got, err := hosts.Best(hs, hosts.Placement{Need: api.Resources{Vcpus: 200, MemoryMB: 61440}})
		if err == nil {
			t.Errorf("a 200-vCPU VM was placed on %s (h1 has 8 vCPUs, h2 lied about being h1)", got.Host)
		}
	}
}

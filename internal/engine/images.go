package engine

import (
	"context"
	"encoding/json"
	"sync"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"
)

// imageIndex is the engine's view of VM_IMAGES: which images are ready on
// which host, for placing a spec that names its image.
type imageIndex struct {
	mu     sync.RWMutex
	ready  map[string]bool // api.ImageKey(host, name)
	synced chan struct{}
	once   sync.Once
}

func newImageIndex() *imageIndex {
	return &imageIndex{ready: map[string]bool{}, synced: make(chan struct{})}
}

// has reports whether host has the image ready.
func (x *imageIndex) has(host, name string) bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return x.ready[api.ImageKey(host, name)]
}

// Ready is closed once the bucket has been read to its end.
func (x *imageIndex) Ready() <-chan struct{} { return x.synced }

// run follows the bucket until ctx ends.
func (x *imageIndex) run(ctx context.Context, kv jetstream.KeyValue) error {
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return nil
			}
			if e == nil {
				x.once.Do(func() { close(x.synced) })
				continue
			}
			var st api.ImageStatus
			ready := e.Operation() == jetstream.KeyValuePut && json.Unmarshal(e.Value(), &st) == nil && st.State == api.ImageReady
			x.mu.Lock()
			if ready {
				x.ready[e.Key()] = true
			} else {
				delete(x.ready, e.Key())
			}
			x.mu.Unlock()
		}
	}
}

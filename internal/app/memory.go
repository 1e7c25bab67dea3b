package app

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// returnMemory gives the heap's free memory back to the OS when more than
// returnAbove of it is held, checked every returnEvery. The Go runtime
// otherwise keeps freed heap up to its GC goal for reuse, so an engine
// (with its embedded server) that took a flood would hold the flood's
// peak long after it ended. The check reads one runtime metric; the
// return is a garbage collection, at most once per check.
func returnMemory(ctx context.Context) {
	sample := []metrics.Sample{{Name: "/memory/classes/heap/free:bytes"}}
	t := time.NewTicker(returnEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		metrics.Read(sample)
		if sample[0].Value.Kind() == metrics.KindUint64 && sample[0].Value.Uint64() > returnAbove {
			debug.FreeOSMemory()
		}
	}
}

const (
	returnEvery = 10 * time.Second
	returnAbove = 8 << 20
)

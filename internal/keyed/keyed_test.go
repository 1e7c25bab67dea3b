package keyed

import (
	"sync"
	"sync/atomic"
	"testing"
)

func TestOrderPerKeyAndBound(t *testing.T) {
	s := New(4)
	var mu sync.Mutex
	got := map[string][]int{}
	var running, peak atomic.Int32
	for i := 0; i < 200; i++ {
		key := string(rune('a' + i%10))
		s.Do(key, func() {
			n := running.Add(1)
			for {
				p := peak.Load()
				if n <= p || peak.CompareAndSwap(p, n) {
					break
				}
			}
			mu.Lock()
			got[key] = append(got[key], i)
			mu.Unlock()
			running.Add(-1)
		})
	}
	s.Wait()
	for k, seq := range got {
		for j := 1; j < len(seq); j++ {
			if seq[j] < seq[j-1] {
				t.Fatalf("key %s ran out of order: %v", k, seq)
			}
		}
		if len(seq) != 20 {
			t.Fatalf("key %s ran %d functions, want 20", k, len(seq))
		}
	}
	if peak.Load() > 4 {
		t.Fatalf("peak concurrency %d > 4", peak.Load())
	}
}

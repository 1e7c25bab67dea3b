// Package keyed runs functions in order per key and concurrently across
// keys, so one VM's commands stay ordered while many VMs proceed at once.
package keyed

import "sync"

// Serial is a per-key FIFO executor with bounded concurrency.
type Serial struct {
	sem    chan struct{}
	mu     sync.Mutex
	queues map[string][]func()
	wg     sync.WaitGroup
}

// New returns an executor running at most limit functions at once.
func New(limit int) *Serial {
	if limit < 1 {
		limit = 1
	}
	return &Serial{sem: make(chan struct{}, limit), queues: map[string][]func(){}}
}

// Do queues fn behind every earlier function for key.
func (s *Serial) Do(key string, fn func()) {
	s.wg.Add(1)
	s.mu.Lock()
	q, running := s.queues[key]
	s.queues[key] = append(q, fn)
	s.mu.Unlock()
	if !running {
		go s.drain(key)
	}
}

func (s *Serial) drain(key string) {
	for {
		s.mu.Lock()
		q := s.queues[key]
		if len(q) == 0 {
			delete(s.queues, key)
			s.mu.Unlock()
			return
		}
		fn := q[0]
		q[0] = nil
		s.queues[key] = q[1:]
		s.mu.Unlock()
		s.sem <- struct{}{}
		fn()
		<-s.sem
		s.wg.Done()
	}
}

// Wait blocks until every queued function has run.
func (s *Serial) Wait() { s.wg.Wait() }

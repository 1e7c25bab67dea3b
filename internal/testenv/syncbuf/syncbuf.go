// Package syncbuf is a bytes.Buffer that tests can write from one
// goroutine (a process's output, a logger) and read from another. It has
// no dependencies, so any package's tests can use it (testenv itself
// imports backends, whose tests could not import testenv).
package syncbuf

import (
	"bytes"
	"sync"
)

// Buffer is safe for concurrent Write and String.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

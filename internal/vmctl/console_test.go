package vmctl

import (
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
)

// attach forwards keystrokes up to the detach key, shows what the console
// prints, and returns when Ctrl-] is typed.
func TestAttachDetachKey(t *testing.T) {
	client, server := net.Pipe()
	got := make(chan string, 1)
	go func() {
		_, _ = server.Write([]byte("login: "))
		buf := make([]byte, 64)
		n, _ := io.ReadAtLeast(server, buf, 4)
		got <- string(buf[:n])
		_, _ = io.Copy(io.Discard, server)
	}()
	in := &slowReader{chunks: []string{"root", "\n\x1dignored"}}
	var out syncbuf.Buffer
	done := make(chan error, 1)
	go func() { done <- attach(client, in, &out) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("attach did not return on the detach key")
	}
	if s := <-got; s != "root" && !strings.HasPrefix(s, "root") {
		t.Fatalf("console got %q", s)
	}
	if !strings.Contains(out.String(), "login: ") {
		t.Fatalf("terminal shows %q", out.String())
	}
}

type slowReader struct{ chunks []string }

func (r *slowReader) Read(p []byte) (int, error) {
	if len(r.chunks) == 0 {
		select {} // a terminal that stays open
	}
	time.Sleep(50 * time.Millisecond)
	n := copy(p, r.chunks[0])
	r.chunks = r.chunks[1:]
	return n, nil
}

package natsserver

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// holdPort listens on a free 127.0.0.1 port for the test's duration.
func holdPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l.Addr().String()
}

func checkInUse(t *testing.T, addr string, err error, took time.Duration) {
	t.Helper()
	if err == nil {
		t.Fatalf("Start on taken %s succeeded", addr)
	}
	if took > 2*time.Second {
		t.Errorf("Start took %s to fail, want under 2s", took)
	}
	var le *ListenError
	if !errors.As(err, &le) || !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("error %v (%T) is not a ListenError for EADDRINUSE", err, err)
	}
	want := "listening on " + addr + ": address already in use (another engine or nats-server is running there; stop it or choose --listen)"
	if err.Error() != want {
		t.Errorf("message\n got: %s\nwant: %s", err, want)
	}
}

func TestStartPortInUse(t *testing.T) {
	addr := holdPort(t)
	start := time.Now()
	s, err := Start(Options{Listen: addr, StoreDir: t.TempDir()})
	if s != nil {
		s.Stop()
	}
	checkInUse(t, addr, err, time.Since(start))
}

// The port taken between the pre-check and the server's bind: the server's
// own failure must end Start at once, not after the ready timeout.
func TestStartPortInUseAfterPrecheck(t *testing.T) {
	saved := precheckListen
	precheckListen = func(string, int) error { return nil }
	t.Cleanup(func() { precheckListen = saved })
	addr := holdPort(t)
	start := time.Now()
	s, err := Start(Options{Listen: addr, StoreDir: t.TempDir(), Logger: nil})
	if s != nil {
		s.Stop()
	}
	checkInUse(t, addr, err, time.Since(start))
}

// A JetStream store that cannot be used fails Start at once too.
func TestStartStoreFailure(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	s, err := Start(Options{Listen: "127.0.0.1:-1", StoreDir: file})
	if s != nil {
		s.Stop()
	}
	if err == nil {
		t.Fatal("Start with a file as store dir succeeded")
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Start took %s to fail, want under 2s", took)
	}
	t.Log(err)
	if !strings.Contains(err.Error(), "JetStream") {
		t.Errorf("error %q does not say JetStream failed", err)
	}
}

func TestStartAndStop(t *testing.T) {
	s, err := Start(Options{Listen: "127.0.0.1:-1", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	addr := s.Addr().String()
	s.Stop()
	// The port is free again once stopped.
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("port %s still taken after Stop: %v", addr, err)
	}
	l.Close()
}

func TestListenErrorOther(t *testing.T) {
	_, err := net.Listen("tcp", "192.0.2.1:4222") // TEST-NET-1: not a local address
	if err == nil {
		t.Skip("192.0.2.1 is local here")
	}
	got := (&ListenError{Addr: "192.0.2.1:4222", Err: err}).Error()
	if !strings.HasPrefix(got, "listening on 192.0.2.1:4222: bind: ") || !strings.HasSuffix(got, "(choose another address with --listen)") {
		t.Errorf("message %q", got)
	}
}

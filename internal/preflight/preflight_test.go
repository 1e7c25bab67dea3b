package preflight_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/preflight"
)

func TestFileCheck(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		mode   os.FileMode
		secret bool
		want   preflight.Status
		says   string
	}{
		{0o644, false, preflight.OK, "(0644)"},
		{0o600, true, preflight.OK, "(0600)"},
		{0o664, false, preflight.Fail, "writable by others"},
		{0o644, true, preflight.Fail, "a secret readable by others"},
	} {
		p := filepath.Join(dir, "f")
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, tc.mode); err != nil {
			t.Fatal(err)
		}
		c := preflight.FileCheck(p, tc.secret)
		if c.Status != tc.want || !strings.Contains(c.Detail, tc.says) {
			t.Errorf("%#o secret=%v: %+v, want %s saying %q", tc.mode, tc.secret, c, tc.want, tc.says)
		}
	}
	if c := preflight.FileCheck(filepath.Join(dir, "none"), true); c.Status != preflight.Fail {
		t.Errorf("a missing file: %+v", c)
	}
}

// TestRun: the checks name what they found; a port in use and a clock
// off by a minute fails, a NATS server that does not answer and a port
// in use warn.
func TestRun(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	skew := time.Minute
	checks := preflight.Run(context.Background(), preflight.Options{
		DataDir: filepath.Join(t.TempDir(), "not", "yet"), NATSURLs: "nats://127.0.0.1:1", MetricsListen: l.Addr().String(), Skew: &skew,
	})
	var b strings.Builder
	failed := preflight.Print(&b, checks)
	out := b.String()
	t.Log("\n" + out)
	for _, want := range []string{"ok    disk", "FAIL  clock  this clock is 1m0s off", "warn  ports  NATS 127.0.0.1:1", "warn  ports  metrics " + l.Addr().String()} {
		if !strings.Contains(out, want) {
			t.Errorf("want %q in\n%s", want, out)
		}
	}
	if !failed {
		t.Error("Print did not report the failures")
	}
}

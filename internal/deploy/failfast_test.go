package deploy_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/fleet"
	"github.com/vmherd/vmherd/internal/testenv"
)

// natsWithTrust starts a nats-server process with TLS and the
// authority's trust, on a free loopback port.
func natsWithTrust(t *testing.T, dir string, a *auth.Authority, pki fleet.PKI) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	trust, err := a.ServerConfig()
	must(t, err)
	conf := filepath.Join(dir, "nats.conf")
	must(t, os.WriteFile(conf, []byte(fmt.Sprintf("listen: 127.0.0.1:%d\ntls { cert_file: %q, key_file: %q, ca_file: %q }\njetstream { store_dir: %q }\n%s",
		port, pki.Cert, pki.Key, pki.CA, filepath.Join(dir, "js"), trust)), 0o644))
	p, err := fleet.Start(dir, "nats", "", testenv.Tool(t, "nats-server"), "-c", conf)
	must(t, err)
	t.Cleanup(p.Kill)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server does not listen:\n%s", p.Output())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return "nats://" + addr
}

// TestFailFast: a worker or engine started with credentials the servers
// will never take, or against a certificate it cannot verify, exits 78
// within 5 s with one line naming the cause; one whose server does not
// answer yet keeps waiting, and connects when it does.
func TestFailFast(t *testing.T) {
	bin := testenv.PlainBinaries(t)
	dir := t.TempDir()
	a, err := auth.Open(filepath.Join(dir, "auth"))
	must(t, err)
	other, err := auth.Open(filepath.Join(dir, "other-auth"))
	must(t, err)
	pki, err := fleet.MakePKI(filepath.Join(dir, "tls"), "127.0.0.1")
	must(t, err)
	otherPKI, err := fleet.MakePKI(filepath.Join(dir, "other-tls"), "127.0.0.1")
	must(t, err)
	url := natsWithTrust(t, dir, a, pki)

	write := func(name string, b []byte, err error) string {
		t.Helper()
		must(t, err)
		p := filepath.Join(dir, name)
		must(t, os.WriteFile(p, b, 0o600))
		return p
	}
	creds := func(name string, a *auth.Authority, id auth.Identity) string {
		b, err := a.IdentityCreds(id)
		return write(name, b, err)
	}
	h1 := auth.Identity{Role: auth.RoleWorker, Host: "h1"}
	good := creds("good.creds", a, h1)
	wrong := creds("wrong.creds", other, h1)
	eb, err := a.IdentityCredsUntil(h1, time.Now().Add(-time.Minute))
	expired := write("expired.creds", eb, err)
	engineWrong := creds("engine-wrong.creds", other, auth.Identity{Role: auth.RoleEngine})

	worker := func(args ...string) []string {
		return append([]string{filepath.Join(bin, "worker"), "--host", "h1", "--backends", "noop", "--data-dir", filepath.Join(dir, "w")}, args...)
	}
	for _, tc := range []struct {
		name string
		argv []string
		want string
	}{
		{"no creds", worker("--nats-url", url, "--tls-ca", pki.CA), "no credentials were given"},
		{"wrong creds", worker("--nats-url", url, "--tls-ca", pki.CA, "--creds", wrong), "they refused the credentials in " + wrong},
		{"expired creds", worker("--nats-url", url, "--tls-ca", pki.CA, "--creds", expired), "expired at"},
		{"another host's creds", worker("--nats-url", url, "--tls-ca", pki.CA, "--creds", creds("h2.creds", a, auth.Identity{Role: auth.RoleWorker, Host: "h2"})), "are worker-h2's, but this worker's host is h1"},
		{"missing creds file", worker("--nats-url", url, "--tls-ca", pki.CA, "--creds", filepath.Join(dir, "nope.creds")), "no such file"},
		{"TLS: another CA", worker("--nats-url", url, "--tls-ca", otherPKI.CA, "--creds", good), "TLS: the server's certificate does not verify against " + otherPKI.CA},
		{"TLS: no CA", worker("--nats-url", url, "--creds", good), "TLS: the server's certificate does not verify"},
		{"engine: wrong creds", []string{filepath.Join(bin, "engine"), "--nats-url", url, "--tls-ca", pki.CA, "--creds", engineWrong, "--data-dir", filepath.Join(dir, "e")}, "they refused the credentials"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			t0 := time.Now()
			out, err := exec.CommandContext(ctx, tc.argv[0], tc.argv[1:]...).CombinedOutput()
			took := time.Since(t0)
			code := -1
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			last := lines[len(lines)-1]
			t.Logf("exit %d after %s: %s", code, took.Round(time.Millisecond), last)
			if code != 78 || took > 5*time.Second || !strings.Contains(last, tc.want) || !strings.Contains(last, "will not heal") {
				t.Errorf("exit %d after %s, want 78 within 5s with a last line naming %q:\n%s", code, took, tc.want, out)
			}
		})
	}

	// What can heal: nothing listens yet. The worker waits, and says so.
	// (That it then connects when the servers come is what every fleet
	// test shows: its workers start before the cluster has a leader.)
	t.Run("no server yet", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		must(t, err)
		addr := l.Addr().String()
		l.Close()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		argv := worker("--nats-url", "nats://"+addr, "--tls-ca", pki.CA, "--creds", good)
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		var buf strings.Builder
		cmd.Stdout, cmd.Stderr = &buf, &buf
		must(t, cmd.Start())
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			t.Fatalf("the worker exited (%v) while no server listened; it should wait:\n%s", err, buf.String())
		case <-time.After(4 * time.Second):
		}
		cancel()
		<-done
		if !strings.Contains(buf.String(), "waiting for NATS") {
			t.Errorf("the worker did not say it waits:\n%s", buf.String())
		}
	})
}

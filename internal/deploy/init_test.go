package deploy_test

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/deploy"
	"github.com/vmherd/vmherd/internal/join"
)

// TestInit: what engine init writes, with a CA of yours: every node
// certificate chains to it and names the node; secrets are 0600; a join
// token per host; a second init over the same directories is refused.
func TestInit(t *testing.T) {
	dir := t.TempDir()
	first := deploy.InitOptions{
		Nodes:   []deploy.Node{{Name: "m1", Addr: "m1"}, {Name: "m2", Addr: "m2"}, {Name: "m3", Addr: "10.0.0.13"}},
		Engines: []string{"m1"}, Hosts: []string{"m2"}, Out: filepath.Join(dir, "ca-fleet"),
		AuthorityDir: filepath.Join(dir, "ca-authority"), ClientPort: 4222, ClusterPort: 6222, MonitorPort: 8222,
	}
	if _, err := deploy.Init(first); err != nil {
		t.Fatal(err)
	}
	// Its CA, given to a second fleet.
	o := first
	o.Out, o.AuthorityDir = filepath.Join(dir, "fleet"), filepath.Join(dir, "authority")
	o.CACert, o.CAKey = filepath.Join(first.AuthorityDir, "ca.pem"), filepath.Join(first.AuthorityDir, "ca-key.pem")
	out, err := deploy.Init(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(out)
	caPEM, err := os.ReadFile(o.CACert)
	must(t, err)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	for _, n := range o.Nodes {
		b, err := os.ReadFile(filepath.Join(o.Out, n.Name, "nats-cert.pem"))
		must(t, err)
		blk, _ := pem.Decode(b)
		cert, err := x509.ParseCertificate(blk.Bytes)
		must(t, err)
		if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: n.Addr, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Errorf("%s's certificate: %v", n.Name, err)
		}
		conf, err := os.ReadFile(filepath.Join(o.Out, n.Name, "nats.conf"))
		must(t, err)
		for _, want := range []string{"server_name: " + n.Name, "client_advertise: \"" + n.Addr + ":4222\"", "sync_interval: always", "type: full", "routes: ["} {
			if !strings.Contains(string(conf), want) {
				t.Errorf("%s's nats.conf lacks %q", n.Name, want)
			}
		}
	}
	for _, p := range []string{"admin.creds", "m1/engine.creds", "m1/nats-key.pem", "m2/nats-key.pem", "join/m2.token"} {
		st, err := os.Stat(filepath.Join(o.Out, p))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, want mode 0600", p, err)
		}
	}
	if _, err := os.Stat(filepath.Join(o.AuthorityDir, "ca-key.pem")); err == nil {
		t.Error("init copied the CA key you gave into its authority")
	}
	if _, err := os.Stat(filepath.Join(o.Out, "m2", "engine.toml")); err == nil {
		t.Error("m2 is no engine but got engine.toml")
	}
	eng, err := os.ReadFile(filepath.Join(o.Out, "m1", "engine.toml"))
	must(t, err)
	if !strings.Contains(string(eng), "authority-dir = \""+o.AuthorityDir+"\"") {
		t.Errorf("the first engine's config does not keep the authority:\n%s", eng)
	}
	tok, err := os.ReadFile(filepath.Join(o.Out, "join", "m2.token"))
	must(t, err)
	jt, err := join.Decode(string(tok), time.Now())
	if err != nil || jt.Host != "m2" || jt.URLs != "nats://m1:4222,nats://m2:4222,nats://10.0.0.13:4222" || jt.CA != string(caPEM) {
		t.Errorf("m2's token: %+v, %v", jt, err)
	}
	if _, err := deploy.Init(o); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("a second init over the first: %v", err)
	}
	if _, err := deploy.ParseNodes([]string{"m1,m2,m1"}); err == nil {
		t.Error("a node named twice was taken")
	}
	even := o
	even.Nodes, even.Out, even.AuthorityDir = o.Nodes[:2], filepath.Join(dir, "x"), filepath.Join(dir, "y")
	if _, err := deploy.Init(even); err == nil || !strings.Contains(err.Error(), "odd") {
		t.Errorf("two nodes: %v", err)
	}
}

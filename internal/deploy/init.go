// Package deploy makes what a fleet of real machines needs, from nothing
// (engine init): the authority, the CA and the NATS nodes' certificates,
// each node's nats-server configuration, each engine's configuration and
// credentials, the admin's credentials and a join token per host; and
// revokes a host's credentials (engine revoke). docs/deploy.md is the
// walk-through; what goes where is in Layout.
package deploy

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/join"
	"github.com/vmherd/vmherd/internal/natsserver"
	"github.com/vmherd/vmherd/internal/safefile"
)

// The paths on each machine that the generated files name.
const (
	EtcDir       = "/etc/vmherd"
	VarDir       = "/var/lib/vmherd"
	AuthorityDir = VarDir + "/authority"
)

// Node is a machine of the NATS cluster: its name (server_name, and a
// name in its certificate) and the address others reach it at.
type Node struct{ Name, Addr string }

// ParseNodes reads NAME[=ADDRESS],...; the address defaults to the name.
func ParseNodes(specs []string) ([]Node, error) {
	var out []Node
	seen := map[string]bool{}
	for _, s := range specs {
		for _, p := range strings.Split(s, ",") {
			p = strings.TrimSpace(p)
			if p == "" {
				continue
			}
			name, addr, ok := strings.Cut(p, "=")
			if !ok {
				addr = name
			}
			if err := api.ValidateHost(name); err != nil || addr == "" {
				return nil, fmt.Errorf("--nodes %q: want NAME[=ADDRESS] with NAME like a host name (%v)", p, err)
			}
			if seen[name] {
				return nil, fmt.Errorf("--nodes: %s twice", name)
			}
			seen[name] = true
			out = append(out, Node{Name: name, Addr: addr})
		}
	}
	return out, nil
}

// InitOptions are engine init's.
type InitOptions struct {
	Nodes   []Node
	Engines []string // machines that run an engine; the first keeps the authority
	Hosts   []string // hosts to make join tokens for
	Out     string   // where the files go (one directory per machine)
	// AuthorityDir is where the authority's keys go, on this machine (the
	// first engine's).
	AuthorityDir string
	// CACert and CAKey: a CA of yours to sign the node certificates
	// (default: make one, kept in AuthorityDir).
	CACert, CAKey string
	TokenTTL      time.Duration
	ClientPort    int
	ClusterPort   int
	MonitorPort   int
	Replicas      int
	Prefix        string
	Sync          string
	ClusterName   string
}

// Fleet is what the authority keeps about the fleet it made
// (<authority>/fleet.json), for engine token and engine revoke.
type Fleet struct {
	URLs   string   `json:"urls"`
	Nodes  []string `json:"nodes"`
	Prefix string   `json:"prefix"`
	CA     string   `json:"ca"` // PEM
}

// ReadFleet reads <dir>/fleet.json.
func ReadFleet(dir string) (Fleet, error) {
	var f Fleet
	b, err := os.ReadFile(filepath.Join(dir, "fleet.json"))
	if err != nil {
		return f, fmt.Errorf("%w (is this the machine where engine init ran? --authority-dir)", err)
	}
	return f, json.Unmarshal(b, &f)
}

// Init makes the fleet's files. It refuses to overwrite an authority or
// an output directory that exist: a second init would make a second,
// different fleet.
func Init(o InitOptions) (string, error) {
	if len(o.Nodes) == 0 {
		return "", errors.New("--nodes: name the NATS cluster's machines, e.g. --nodes m1,m2,m3")
	}
	if len(o.Nodes)%2 == 0 {
		return "", fmt.Errorf("--nodes: %d nodes; JetStream wants an odd number (3 or 5) to keep a majority", len(o.Nodes))
	}
	if len(o.Engines) == 0 {
		return "", errors.New("--engines: name the machines that run an engine (the first is this one, which keeps the authority)")
	}
	for _, h := range append(append([]string{}, o.Engines...), o.Hosts...) {
		if err := api.ValidateHost(h); err != nil {
			return "", fmt.Errorf("%q: %w", h, err)
		}
	}
	if o.Replicas == 0 {
		o.Replicas = min(3, len(o.Nodes))
	}
	if o.Prefix == "" {
		o.Prefix = api.DefaultPrefix
	}
	if o.Sync == "" {
		o.Sync = natsserver.DefaultSync
	}
	if o.ClusterName == "" {
		o.ClusterName = "vmherd"
	}
	for _, d := range []string{o.Out, filepath.Join(o.AuthorityDir, "operator.nk")} {
		if _, err := os.Stat(d); err == nil {
			return "", fmt.Errorf("%s exists: init makes a new fleet and will not overwrite it (engine token issues tokens for an existing one)", d)
		}
	}
	a, err := auth.Open(o.AuthorityDir)
	if err != nil {
		return "", err
	}
	var c *ca
	if o.CACert != "" || o.CAKey != "" {
		if c, err = loadCA(o.CACert, o.CAKey); err != nil {
			return "", err
		}
	} else {
		var keyPEM []byte
		if c, keyPEM, err = newCA(); err != nil {
			return "", err
		}
		if err := safefile.Write(filepath.Join(o.AuthorityDir, "ca-key.pem"), keyPEM, 0o600); err != nil {
			return "", err
		}
	}
	var urls []string
	for _, n := range o.Nodes {
		urls = append(urls, "nats://"+hostPort(n.Addr, o.ClientPort))
	}
	fleet := Fleet{URLs: strings.Join(urls, ","), Prefix: o.Prefix, CA: string(c.PEM)}
	for _, n := range o.Nodes {
		fleet.Nodes = append(fleet.Nodes, n.Name)
	}
	w := &writer{}
	w.file(filepath.Join(o.AuthorityDir, "ca.pem"), c.PEM, 0o644)
	fb, _ := json.MarshalIndent(fleet, "", "  ")
	w.file(filepath.Join(o.AuthorityDir, "fleet.json"), fb, 0o600)
	sys, err := a.SystemCreds()
	if err != nil {
		return "", err
	}
	w.file(filepath.Join(o.AuthorityDir, "sys.creds"), sys, 0o600)

	if err := os.MkdirAll(o.Out, 0o700); err != nil {
		return "", err
	}
	w.file(filepath.Join(o.Out, "ca.pem"), c.PEM, 0o644)
	admin, err := a.IdentityCreds(auth.Identity{Role: auth.RoleAdmin, Names: api.Names{Prefix: o.Prefix}})
	if err != nil {
		return "", err
	}
	w.file(filepath.Join(o.Out, "admin.creds"), admin, 0o600)

	machines := map[string]bool{}
	var order []string
	for _, n := range o.Nodes {
		machines[n.Name] = true
		order = append(order, n.Name)
	}
	for _, e := range o.Engines {
		if !machines[e] {
			machines[e] = true
			order = append(order, e)
		}
	}
	var summary strings.Builder
	for _, m := range order {
		dir := filepath.Join(o.Out, m)
		w.file(filepath.Join(dir, "ca.pem"), c.PEM, 0o644)
		var what []string
		if n, ok := nodeNamed(o.Nodes, m); ok {
			cert, key, err := c.nodeCert(n.Name, n.Addr)
			if err != nil {
				return "", err
			}
			w.file(filepath.Join(dir, "nats-cert.pem"), cert, 0o644)
			w.file(filepath.Join(dir, "nats-key.pem"), key, 0o600)
			w.file(filepath.Join(dir, "operator.jwt"), []byte(a.OperatorJWT), 0o644)
			w.file(filepath.Join(dir, "nats.conf"), []byte(nodeConfig(o, n, a)), 0o644)
			what = append(what, "NATS node")
		}
		for i, e := range o.Engines {
			if e != m {
				continue
			}
			creds, err := a.IdentityCreds(auth.Identity{Role: auth.RoleEngine, User: "engine-" + m, Names: api.Names{Prefix: o.Prefix}})
			if err != nil {
				return "", err
			}
			w.file(filepath.Join(dir, "engine.creds"), creds, 0o600)
			w.file(filepath.Join(dir, "engine.toml"), []byte(engineConfig(o, m, fleet.URLs, i == 0)), 0o644)
			what = append(what, "engine")
			if i == 0 {
				what = append(what, "authority ("+o.AuthorityDir+")")
			}
		}
		fmt.Fprintf(&summary, "  %-12s %s: copy %s/ to %s/ on %s\n", m, strings.Join(what, ", "), dir, EtcDir, m)
	}
	for _, h := range o.Hosts {
		t, err := join.Issue(a, h, fleet.URLs, o.Prefix, string(c.PEM), o.TokenTTL)
		if err != nil {
			return "", err
		}
		p := filepath.Join(o.Out, "join", h+".token")
		w.file(p, []byte(t.Encode()), 0o600)
		fmt.Fprintf(&summary, "  %-12s host: copy %s to %s, then: worker join --token FILE (expires %s)\n", h, p, h, t.Expires.UTC().Format(time.RFC3339))
	}
	if w.err != nil {
		return "", w.err
	}
	return fmt.Sprintf("made a fleet: NATS %s\n%s  admin.creds and ca.pem in %s are for vmctl; the authority's keys stay in %s (back it up)\n",
		fleet.URLs, summary.String(), o.Out, o.AuthorityDir), nil
}

func nodeNamed(ns []Node, name string) (Node, bool) {
	for _, n := range ns {
		if n.Name == name {
			return n, true
		}
	}
	return Node{}, false
}

func hostPort(h string, port int) string {
	if strings.Contains(h, ":") {
		h = "[" + h + "]"
	}
	return h + ":" + strconv.Itoa(port)
}

// writer writes files, keeping the first error.
type writer struct{ err error }

func (w *writer) file(path string, b []byte, mode os.FileMode) {
	if w.err != nil {
		return
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		w.err = err
		return
	}
	w.err = safefile.Write(path, b, mode)
}

// nodeConfig is a node's nats-server configuration.
func nodeConfig(o InitOptions, n Node, a *auth.Authority) string {
	var routes []string
	for _, m := range o.Nodes {
		if m.Name != n.Name {
			routes = append(routes, "nats-route://"+hostPort(m.Addr, o.ClusterPort))
		}
	}
	tls := fmt.Sprintf(`tls {
    cert_file: %q
    key_file: %q
    ca_file: %q
    timeout: 5
  }`, EtcDir+"/nats-cert.pem", EtcDir+"/nats-key.pem", EtcDir+"/ca.pem")
	return fmt.Sprintf(`# nats-server configuration of %[1]s, made by vmherd's engine init.
# It goes to %[2]s/nats.conf on %[1]s; vmherd-nats.service runs
#   nats-server -c %[2]s/nats.conf
server_name: %[1]s
listen: "0.0.0.0:%[3]d"
# What the other nodes and clients are told to reach this node at: a name
# in its certificate, so TLS verification holds for discovered servers too.
client_advertise: %[19]q
# Monitoring (/varz, /jsz, /healthz): loopback only.
http: "127.0.0.1:%[4]d"
# The largest command and the event that carries it.
max_payload: %[5]d
%[6]s

jetstream {
  store_dir: %[7]q
  # "always": every write reaches the disk before it is acknowledged.
  sync_interval: %[8]s
  limits { default_max_consumers: %[9]d }
}

cluster {
  name: %[10]s
  listen: "0.0.0.0:%[11]d"
  advertise: %[20]q
  routes: [
    %[12]s
  ]
  # Routes are mutual TLS: each node verifies the other with the CA.
  %[6]s
}

# Trust: only credentials signed by the fleet's authority connect.
operator: %[13]q
system_account: %[14]s
# The account JWTs live in a directory on each node; engine revoke pushes
# a new one (revocations) to all nodes through the system account.
resolver: {
  type: full
  dir: %[15]q
  allow_delete: false
  interval: "2m"
  timeout: "5s"
}
resolver_preload: {
  %[16]s: %[17]q
  %[14]s: %[18]q
}
`, n.Name, EtcDir, o.ClientPort, o.MonitorPort, auth.MaxPayload, tls,
		VarDir+"/nats", o.Sync, natsserver.DefaultMaxConsumers, o.ClusterName, o.ClusterPort,
		strings.Join(routes, "\n    "), EtcDir+"/operator.jwt", a.SysPub, VarDir+"/nats/jwt",
		a.AccountPub, a.AccountJWT, a.SystemJWT, hostPort(n.Addr, o.ClientPort), hostPort(n.Addr, o.ClusterPort))
}

// engineConfig is an engine's configuration file.
func engineConfig(o InitOptions, m, urls string, authority bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, `# The engine of %[1]s, made by engine init. Every key is a flag:
# engine config --print lists them all with their defaults.
data-dir = %[2]q
engine-id = %[1]q
nats-url = %[3]q
creds = %[4]q
tls-ca = %[5]q
replicas = %[6]d
prefix = %[7]q
metrics-listen = "127.0.0.1:9100"
`, m, VarDir+"/engine", urls, EtcDir+"/engine.creds", EtcDir+"/ca.pem", o.Replicas, o.Prefix)
	if authority {
		fmt.Fprintf(&b, "# This engine keeps the authority: it answers hosts joining with a token.\nauthority-dir = %q\n", o.AuthorityDir)
	}
	return b.String()
}

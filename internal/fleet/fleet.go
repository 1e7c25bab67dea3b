// Package fleet brings up vmherd's fleet topology on one Linux machine, for
// tests and for scripts/fleet: a cluster of three nats-server processes with
// JetStream (R3), engines against it, and one worker per "host", each host
// in a network namespace of its own (ip netns), joined to the NATS nodes by
// a veth pair on a bridge. It needs root and iproute2. Down removes all of
// it, processes, namespaces, links and files, even after a failure half-way.
package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/auth"
)

// HostConfig is one host: its worker's id and backends.
type HostConfig struct {
	Name     string
	Backends string // the worker's --backends, e.g. "noop" or "noop,qemu"
	// WorkerArgs are extra worker flags.
	WorkerArgs []string
}

// Config of a fleet.
type Config struct {
	// Dir holds the fleet's files: NATS stores, data dirs, logs.
	Dir string
	// Bin is the directory with the engine, worker and vmctl binaries.
	Bin string
	// NatsServer is the nats-server binary.
	NatsServer string
	// Nodes is the number of NATS nodes (default 3).
	Nodes int
	// Engines is the number of engines (default 2).
	Engines int
	// Hosts are the hosts, each in its own netns.
	Hosts []HostConfig
	// Tag names the fleet's network objects (at most 5 characters of
	// [a-z0-9]); random when empty.
	Tag string
	// Subnet is the third octet of 10.88.<Subnet>.0/24 (random when 0).
	Subnet int
	// EngineArgs are extra engine flags.
	EngineArgs []string
	// Log receives progress lines (nil: none).
	Log func(format string, args ...any)
}

// Fleet is a running topology.
type Fleet struct {
	cfg     Config
	Bridge  string
	Gateway string // the bridge's address, where the NATS nodes listen
	// URLs are the NATS nodes' client URLs, comma separated: the value of
	// --nats-url for every engine, worker and vmctl.
	URLs string
	// TLS: the nodes' certificates; clients verify them with TLS.CA.
	TLS PKI
	// Creds are the credentials files the fleet issued, by identity name:
	// "admin", "engine", "worker-<host>".
	Creds   map[string]string
	auth    *auth.Authority
	Nodes   []*Proc
	Engines []*Proc
	Workers map[string]*Proc
	Hosts   map[string]*Host
	links   []string
}

// Host is one host's namespace and address.
type Host struct {
	Name  string
	NetNS string
	Addr  string
	veth  string // the root side of its veth pair
	cfg   HostConfig
}

func (c *Config) defaults() error {
	if c.Nodes == 0 {
		c.Nodes = 3
	}
	if c.Engines == 0 {
		c.Engines = 2
	}
	if c.Tag == "" {
		var b [2]byte
		_, _ = rand.Read(b[:])
		c.Tag = "f" + hex.EncodeToString(b[:])
	}
	if len(c.Tag) > 5 || strings.Trim(c.Tag, "abcdefghijklmnopqrstuvwxyz0123456789") != "" {
		return fmt.Errorf("fleet: tag %q: at most 5 of [a-z0-9]", c.Tag)
	}
	if c.Subnet == 0 {
		var b [1]byte
		_, _ = rand.Read(b[:])
		c.Subnet = 10 + int(b[0])%200
	}
	if c.Log == nil {
		c.Log = func(string, ...any) {}
	}
	for _, h := range c.Hosts {
		if h.Name == "" || len(h.Name) > 4 {
			return fmt.Errorf("fleet: host name %q: 1 to 4 characters (it names network links)", h.Name)
		}
	}
	return nil
}

// Up builds the network, starts the NATS cluster, the engines and the
// workers, and waits until every worker has heartbeated. On error it
// removes what it made.
func Up(ctx context.Context, cfg Config) (f *Fleet, err error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("fleet: network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, errors.New("fleet: the ip command (iproute2) is missing: run scripts/setup")
	}
	f = &Fleet{cfg: cfg, Workers: map[string]*Proc{}, Hosts: map[string]*Host{},
		Bridge: "vmh" + cfg.Tag + "br", Gateway: fmt.Sprintf("10.88.%d.1", cfg.Subnet)}
	defer func() {
		if err != nil {
			f.Down()
			f = nil
		}
	}()
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return f, err
	}
	if err := f.network(); err != nil {
		return f, err
	}
	if err := f.trust(); err != nil {
		return f, err
	}
	if err := f.startNodes(ctx); err != nil {
		return f, err
	}
	for i := range cfg.Engines {
		if err := f.StartEngine(i); err != nil {
			return f, err
		}
	}
	for _, h := range cfg.Hosts {
		if err := f.StartWorker(h.Name); err != nil {
			return f, err
		}
	}
	if err := f.waitReady(ctx); err != nil {
		return f, err
	}
	cfg.Log("fleet %s up: NATS %s; engines %d; hosts %s", cfg.Tag, f.URLs, len(f.Engines), f.hostList())
	return f, nil
}

// trust makes the fleet's authority (the engines' and workers'
// credentials) and certificates: the cluster runs with authentication and
// TLS on, for clients and for routes.
func (f *Fleet) trust() error {
	var err error
	if f.TLS, err = MakePKI(filepath.Join(f.cfg.Dir, "tls"), f.Gateway); err != nil {
		return err
	}
	dir := filepath.Join(f.cfg.Dir, "auth")
	if f.auth, err = auth.Open(dir); err != nil {
		return err
	}
	f.Creds = map[string]string{}
	ids := []auth.Identity{{Role: auth.RoleAdmin}, {Role: auth.RoleEngine}}
	for _, h := range f.cfg.Hosts {
		ids = append(ids, auth.Identity{Role: auth.RoleWorker, Host: h.Name})
	}
	for _, id := range ids {
		path := filepath.Join(dir, id.Name()+".creds")
		if err := f.auth.WriteCreds(path, id); err != nil {
			return err
		}
		f.Creds[id.Name()] = path
	}
	return nil
}

// AdminCreds is the admin's credentials file (vmctl, tests, the nats CLI).
func (f *Fleet) AdminCreds() string { return f.Creds["admin"] }

// ClientOptions are the NATS options of a client of the fleet with the
// admin's credentials.
func (f *Fleet) ClientOptions() []nats.Option {
	return []nats.Option{nats.UserCredentials(f.AdminCreds()), nats.RootCAs(f.TLS.CA)}
}

func (f *Fleet) hostList() string {
	var s []string
	for _, h := range f.cfg.Hosts {
		hh := f.Hosts[h.Name]
		s = append(s, fmt.Sprintf("%s (netns %s, %s, %s)", h.Name, hh.NetNS, hh.Addr, h.Backends))
	}
	return strings.Join(s, ", ")
}

func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// network makes the bridge (with the gateway address the NATS nodes listen
// on) and, per host, a namespace joined to it by a veth pair.
func (f *Fleet) network() error {
	if err := ipCmd("link", "add", f.Bridge, "type", "bridge"); err != nil {
		return err
	}
	f.links = append(f.links, f.Bridge)
	if err := ipCmd("addr", "add", f.Gateway+"/24", "dev", f.Bridge); err != nil {
		return err
	}
	if err := ipCmd("link", "set", f.Bridge, "up"); err != nil {
		return err
	}
	for i, hc := range f.cfg.Hosts {
		h := &Host{Name: hc.Name, NetNS: "vmh" + f.cfg.Tag + hc.Name, cfg: hc,
			Addr: fmt.Sprintf("10.88.%d.%d", f.cfg.Subnet, 10+i), veth: "vmh" + f.cfg.Tag + hc.Name + "a"}
		f.Hosts[hc.Name] = h
		inside := "vmh" + f.cfg.Tag + hc.Name + "b"
		steps := [][]string{
			{"netns", "add", h.NetNS},
			{"link", "add", h.veth, "type", "veth", "peer", "name", inside},
			{"link", "set", inside, "netns", h.NetNS},
			{"link", "set", h.veth, "master", f.Bridge},
			{"link", "set", h.veth, "up"},
			{"-n", h.NetNS, "link", "set", "lo", "up"},
			{"-n", h.NetNS, "addr", "add", h.Addr + "/24", "dev", inside},
			{"-n", h.NetNS, "link", "set", inside, "up"},
			{"-n", h.NetNS, "route", "add", "default", "via", f.Gateway},
		}
		for j, s := range steps {
			if err := ipCmd(s...); err != nil {
				return err
			}
			if j == 1 {
				f.links = append(f.links, h.veth)
			}
		}
	}
	return nil
}

// Dir is the fleet's directory.
func (f *Fleet) Dir() string { return f.cfg.Dir }

// CutHost takes a host off the network (its veth down) or puts it back.
func (f *Fleet) CutHost(name string, cut bool) error {
	h := f.Hosts[name]
	if h == nil {
		return fmt.Errorf("fleet: no host %s", name)
	}
	state := "up"
	if cut {
		state = "down"
	}
	return ipCmd("link", "set", h.veth, state)
}

func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// startNodes starts the NATS cluster on the gateway address.
func (f *Fleet) startNodes(ctx context.Context) error {
	n := f.cfg.Nodes
	client, route := make([]int, n), make([]int, n)
	for i := range n {
		var err error
		if client[i], err = freePort(f.Gateway); err != nil {
			return err
		}
		if route[i], err = freePort(f.Gateway); err != nil {
			return err
		}
	}
	var urls []string
	for i := range n {
		urls = append(urls, fmt.Sprintf("nats://%s:%d", f.Gateway, client[i]))
	}
	f.URLs = strings.Join(urls, ",")
	for i := range n {
		var routes []string
		for j := range n {
			if j != i {
				routes = append(routes, fmt.Sprintf("nats-route://%s:%d", f.Gateway, route[j]))
			}
		}
		name := fmt.Sprintf("n%d", i+1)
		conf := filepath.Join(f.cfg.Dir, name+".conf")
		trust, err := f.auth.ServerConfig()
		if err != nil {
			return err
		}
		tls := fmt.Sprintf("tls { cert_file: %q, key_file: %q, ca_file: %q, timeout: 5 }", f.TLS.Cert, f.TLS.Key, f.TLS.CA)
		body := fmt.Sprintf(`server_name: %s
listen: %s:%d
%s
jetstream { store_dir: %q }
cluster {
  name: vmherd-%s
  listen: %s:%d
  routes: [%s]
  %s
}
%s`, name, f.Gateway, client[i], tls, filepath.Join(f.cfg.Dir, name), f.cfg.Tag, f.Gateway, route[i], strings.Join(routes, ", "), tls, trust)
		if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
			return err
		}
		p, err := Start(f.cfg.Dir, name, "", f.cfg.NatsServer, "-c", conf)
		if err != nil {
			return err
		}
		f.Nodes = append(f.Nodes, p)
	}
	for i, p := range f.Nodes {
		if err := waitTCP(ctx, fmt.Sprintf("%s:%d", f.Gateway, client[i]), 20*time.Second); err != nil {
			return fmt.Errorf("fleet: NATS node %s: %w\n%s", p.Name, err, p.Output())
		}
	}
	return nil
}

// RestartNode starts node i (0-based) again with its configuration and
// store, after Kill.
func (f *Fleet) RestartNode(i int) error {
	old := f.Nodes[i]
	p, err := Start(f.cfg.Dir, old.Name, "", f.cfg.NatsServer, old.Args...)
	if err != nil {
		return err
	}
	f.Nodes[i] = p
	return nil
}

func waitTCP(ctx context.Context, addr string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listens on %s after %s: %w", addr, within, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// StartEngine starts engine i against the cluster with R3 streams.
func (f *Fleet) StartEngine(i int) error {
	name := fmt.Sprintf("engine%d", i+1)
	args := append([]string{"--nats-url", f.URLs, "--replicas", strconv.Itoa(min(3, f.cfg.Nodes)),
		"--creds", f.Creds["engine"], "--tls-ca", f.TLS.CA,
		"--data-dir", filepath.Join(f.cfg.Dir, name), "--engine-id", name}, f.cfg.EngineArgs...)
	p, err := Start(f.cfg.Dir, name, "", filepath.Join(f.cfg.Bin, "engine"), args...)
	if err != nil {
		return err
	}
	if i < len(f.Engines) {
		f.Engines[i] = p
	} else {
		f.Engines = append(f.Engines, p)
	}
	return nil
}

// StartWorker starts the worker of a host inside the host's namespace.
func (f *Fleet) StartWorker(host string) error {
	h := f.Hosts[host]
	if h == nil {
		return fmt.Errorf("fleet: no host %s", host)
	}
	args := append([]string{"--nats-url", f.URLs, "--host", h.Name, "--backends", h.cfg.Backends,
		"--creds", f.Creds["worker-"+h.Name], "--tls-ca", f.TLS.CA,
		"--data-dir", filepath.Join(f.cfg.Dir, "host-"+h.Name), "--heartbeat", "1s",
		"--migration-listen", h.Addr}, h.cfg.WorkerArgs...)
	p, err := Start(f.cfg.Dir, "worker-"+h.Name, h.NetNS, filepath.Join(f.cfg.Bin, "worker"), args...)
	if err != nil {
		return err
	}
	f.Workers[h.Name] = p
	return nil
}

// Vmctl runs vmctl against the fleet, inside netns (empty: the root
// namespace), and returns its output and exit code.
func (f *Fleet) Vmctl(ctx context.Context, netns string, args ...string) (string, int) {
	return run(f.VmctlCmd(ctx, netns, args...))
}

// VmctlCmd is a vmctl command against the fleet inside netns, for the
// caller to give its input and output and to start (console,
// port-forward, log -f).
func (f *Fleet) VmctlCmd(ctx context.Context, netns string, args ...string) *exec.Cmd {
	return command(ctx, netns, filepath.Join(f.cfg.Bin, "vmctl"),
		append([]string{"--server", f.URLs, "--creds", f.AdminCreds(), "--tls-ca", f.TLS.CA}, args...)...)
}

// Exec runs a command inside netns (empty: the root namespace).
func (f *Fleet) Exec(ctx context.Context, netns, bin string, args ...string) (string, int) {
	return run(command(ctx, netns, bin, args...))
}

// run runs cmd and returns its output and exit code.
func run(cmd *exec.Cmd) (string, int) {
	out, err := cmd.CombinedOutput()
	code := 0
	if err != nil {
		code = -1
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else {
			out = append(out, []byte(err.Error())...)
		}
	}
	return string(out), code
}

func command(ctx context.Context, netns, bin string, args ...string) *exec.Cmd {
	if netns == "" {
		return exec.CommandContext(ctx, bin, args...)
	}
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", netns, bin}, args...)...)
}

// waitReady waits until an engine pulls commands (the shared command
// consumer has pull requests open) and every host has heartbeated.
func (f *Fleet) waitReady(ctx context.Context) error {
	nc, err := nats.Connect(f.URLs, append(f.ClientOptions(), nats.Name("vmherd-fleet"), nats.MaxReconnects(-1))...)
	if err != nil {
		return fmt.Errorf("fleet: connecting to %s: %w", f.URLs, err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	names := api.DefaultNames
	deadline := time.Now().Add(2 * time.Minute)
	for {
		why := f.notReady(ctx, js, names)
		if why == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("fleet: not ready after 2 minutes: %s\n%s", why, f.Logs())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (f *Fleet) notReady(ctx context.Context, js jetstream.JetStream, names api.Names) string {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := js.Consumer(cctx, names.CommandsStream(), names.CommandConsumer())
	if err != nil {
		return "no engine command consumer yet: " + err.Error()
	}
	if c.CachedInfo().NumWaiting == 0 {
		return "no engine pulls commands yet"
	}
	kv, err := js.KeyValue(cctx, names.HostsBucket())
	if err != nil {
		return "no hosts bucket yet: " + err.Error()
	}
	for _, h := range f.cfg.Hosts {
		if _, err := kv.Get(cctx, h.Name); err != nil {
			return fmt.Sprintf("host %s has not heartbeated: %v", h.Name, err)
		}
	}
	return ""
}

// NatsCLI is the nats CLI next to nats-server (scripts/setup installs both).
func (c Config) NatsCLI() string { return filepath.Join(filepath.Dir(c.NatsServer), "nats") }

// Logs is the tail of every process's log, for failure messages.
func (f *Fleet) Logs() string {
	var b strings.Builder
	all := append(append([]*Proc{}, f.Nodes...), f.Engines...)
	for _, h := range f.cfg.Hosts {
		if p := f.Workers[h.Name]; p != nil {
			all = append(all, p)
		}
	}
	for _, p := range all {
		out := p.Output()
		if len(out) > 3000 {
			out = "…" + out[len(out)-3000:]
		}
		fmt.Fprintf(&b, "--- %s ---\n%s\n", p.Name, out)
	}
	return b.String()
}

// Down stops every process and removes the namespaces and links. It is
// safe to call more than once and on a half-built fleet.
func (f *Fleet) Down() {
	var all []*Proc
	for _, p := range f.Workers {
		all = append(all, p)
	}
	all = append(all, f.Engines...)
	all = append(all, f.Nodes...)
	for _, p := range all {
		if p != nil {
			p.Kill()
		}
	}
	killVMs(f.cfg.Dir)
	for _, h := range f.Hosts {
		_ = ipCmd("netns", "del", h.NetNS)
	}
	for i := len(f.links) - 1; i >= 0; i-- {
		_ = ipCmd("link", "del", f.links[i])
	}
	f.links = nil
}

// KillLeftovers kills what a fleet in dir left running when the process
// that brought it up died without Down: its processes (by the pidfiles
// Start writes, each checked against its command line) and its VMs.
func KillLeftovers(dir string) {
	pidfiles, _ := filepath.Glob(filepath.Join(dir, "*.pid"))
	for _, pf := range pidfiles {
		if pid := pidNaming(pf, dir); pid > 0 {
			_ = syscall.Kill(-pid, syscall.SIGKILL) // its process group
		}
	}
	killVMs(dir)
}

// pidNaming reads the PID in pidfile, and returns it if that process's
// command line contains s (so a reused PID is left alone), else 0.
func pidNaming(pidfile, s string) int {
	b, err := os.ReadFile(pidfile)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return 0
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), s) {
		return 0
	}
	return pid
}

// killVMs kills the hypervisor processes (which outlive their workers by
// design) whose pidfiles are under dir, checking that each PID's command
// line names the file, so a reused PID is left alone.
func killVMs(dir string) {
	if dir == "" {
		return
	}
	pidfiles, _ := filepath.Glob(filepath.Join(dir, "host-*", "vms", "*", "*.pid"))
	for _, pf := range pidfiles {
		if pid := pidNaming(pf, pf); pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// Sweep removes the network objects of fleets tagged tag (all fleets when
// tag is empty) that a killed process left behind.
func Sweep(tag string) {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], "vmh"+tag) {
			_ = ipCmd("netns", "del", f[0])
		}
	}
	out, _ = exec.Command("ip", "-o", "link", "show").Output()
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if strings.HasPrefix(name, "vmh"+tag) {
			_ = ipCmd("link", "del", name)
		}
	}
}

// Proc is a process of the fleet, in its own process group, logging to a
// file.
type Proc struct {
	Name string
	Args []string
	Log  string
	cmd  *exec.Cmd
	done chan struct{}
}

// Start starts bin with args (inside netns when not empty), logging to
// <dir>/<name>.log.
func Start(dir, name, netns, bin string, args ...string) (*Proc, error) {
	logPath := filepath.Join(dir, name+".log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := command(context.Background(), netns, bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	_ = os.WriteFile(filepath.Join(dir, name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
	p := &Proc{Name: name, Args: args, Log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

// Output is what the process logged so far.
func (p *Proc) Output() string {
	b, _ := os.ReadFile(p.Log)
	return string(b)
}

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Kill sends SIGKILL to the process group and waits for the end.
func (p *Proc) Kill() {
	if p.Exited() {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// Term sends SIGTERM and waits up to d, then kills.
func (p *Proc) Term(d time.Duration) {
	if p.Exited() {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(d):
		p.Kill()
	}
}

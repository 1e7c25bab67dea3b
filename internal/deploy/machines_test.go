package deploy_test

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The machines' own directories: each machine's mount namespace has its
// own of these (bound from <root>/<machine>/<key>).
var machineDirs = []struct{ key, path string }{
	{"etc", "/etc/vmherd"},
	{"var", "/var/lib/vmherd"},
	{"opt", "/opt/vmherd"},
	{"systemd", "/etc/systemd/system"},
}

// scpShim copies between the machines' directories: [user@]HOST:PATH is
// PATH on machine HOST (a relative PATH is in its home).
const scpShim = `#!/bin/bash
# scp for the deploy doc test (internal/deploy/machines_test.go)
set -euo pipefail
args=()
for a in "$@"; do case "$a" in -*) ;; *) args+=("$a") ;; esac; done
n=${#args[@]}
map() {
  local s=${1#*@}
  local m=${s%%:*} p=${s#*:}
  local root=$VMHERD_DOCTEST_ROOT/$m
  [ -d "$root" ] || { echo "scp: no machine $m" >&2; exit 1; }
  case "$p" in
    /etc/vmherd*) echo "$root/etc${p#/etc/vmherd}" ;;
    /var/lib/vmherd*) echo "$root/var${p#/var/lib/vmherd}" ;;
    /opt/vmherd*) echo "$root/opt${p#/opt/vmherd}" ;;
    /*) echo "scp: $p: the test's machines share everything outside their vmherd directories" >&2; exit 1 ;;
    *) echo "$root/home/$p" ;;
  esac
}
dst=${args[n-1]}
case "$dst" in *:*) dst=$(map "$dst") ;; esac
for s in "${args[@]:0:n-1}"; do
  case "$s" in *:*) s=$(map "$s") ;; esac
  cp -r --preserve=mode "$s" "$dst"
done
`

// systemctlShim runs a unit's ExecStart= as systemd would start it (no
// sandbox, no restarts), in the background, logging to
// $VMHERD_DOCTEST_RUN/<unit>.log; is-active reports whether it runs.
const systemctlShim = `#!/bin/bash
# systemctl for the deploy doc test (internal/deploy/machines_test.go)
set -euo pipefail
run=$VMHERD_DOCTEST_RUN
mkdir -p "$run"
unit() { case "$1" in *.service) echo "$1" ;; *) echo "$1.service" ;; esac; }
start() {
  local u; u=$(unit "$1")
  local f=/etc/systemd/system/$u
  [ -f "$f" ] || { echo "Failed to start $u: Unit $u not found." >&2; exit 5; }
  local exe; exe=$(sed -n 's/^ExecStart=//p' "$f" | tail -n 1)
  local typ; typ=$(sed -n 's/^Type=//p' "$f" | tail -n 1)
  rm -f "$run/$u.rc" "$run/$u.ready"
  if [ "$typ" = notify ]; then export NOTIFY_SOCKET=$run/$u.notify; else unset NOTIFY_SOCKET; fi
  setsid bash -c "$exe & echo \$! >'$run/$u.main'; wait \$!; echo \$? >'$run/$u.rc'" >>"$run/$u.log" 2>&1 </dev/null &
  echo $! >"$run/$u.pid"
  echo "$exe" >"$run/$u.cmd"
  if [ "$typ" = notify ]; then
    # As systemd does: the start job ends when the daemon says READY=1
    # (the test's listener writes $u.ready), or fails when it exits.
    for _ in $(seq 1 600); do
      [ -f "$run/$u.ready" ] && return 0
      if [ -f "$run/$u.rc" ]; then
        echo "Job for $u failed because the control process exited with error code." >&2
        exit 1
      fi
      sleep 0.5
    done
    echo "Job for $u failed because a timeout was exceeded." >&2
    exit 1
  fi
}
stop() {
  # SIGTERM to the main process only, as systemd does with the worker's
  # KillMode=process (its VMs stay); the other units have no children.
  local u; u=$(unit "$1")
  active "$u" || return 0
  kill -TERM "$(cat "$run/$u.main")"
  for _ in $(seq 1 240); do [ -f "$run/$u.rc" ] && return 0; sleep 0.5; done
  echo "Job for $u: stop timed out" >&2
  exit 1
}
active() {
  local u; u=$(unit "$1")
  [ -f "$run/$u.pid" ] && [ ! -f "$run/$u.rc" ] && kill -0 "$(cat "$run/$u.pid")" 2>/dev/null
}
cmd=$1; shift
case "$cmd" in
  daemon-reload) ;;
  enable)
    [ "${1:-}" = --now ] || exit 0
    shift
    for u in "$@"; do start "$u"; done ;;
  start) for u in "$@"; do start "$u"; done ;;
  stop) for u in "$@"; do stop "$u"; done ;;
  restart) for u in "$@"; do stop "$u"; start "$u"; done ;;
  is-active)
    rc=0
    for u in "$@"; do
      if active "$u"; then echo active
      elif [ "$(cat "$run/$(unit "$u").rc" 2>/dev/null || echo 0)" != 0 ]; then echo failed; rc=3
      else echo inactive; rc=3; fi
    done
    exit $rc ;;
  *) echo "systemctl (deploy doc test): $cmd is not emulated" >&2; exit 1 ;;
esac
`

// machines is the test's three machines on a bridge, and a workstation.
type machines struct {
	t      *testing.T
	root   string // <root>/<machine>/...
	shims  string
	bridge string
	byName map[string]*machine
	order  []*machine
	made   []string // mount points this test created
}

// machine is a shell on one machine, kept open across its commands.
type machine struct {
	name, ns, addr, dir string
	cmd                 *exec.Cmd
	in                  io.WriteCloser
	lines               chan string
}

func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// newMachines makes the bridge, a namespace per machine with its own
// vmherd directories, hostname and /etc/hosts, and starts a shell in
// each.
func newMachines(t *testing.T, names []string, ws wsConfig) *machines {
	var b [2]byte
	_, _ = rand.Read(b[:])
	tag := hex.EncodeToString(b[:])
	subnet := 20 + int(b[0])%200
	ms := &machines{t: t, root: t.TempDir(), bridge: "vmd" + tag + "br", byName: map[string]*machine{}}
	t.Cleanup(ms.down)
	ms.shims = filepath.Join(ms.root, "shims")
	must(t, os.MkdirAll(ms.shims, 0o755))
	must(t, os.WriteFile(filepath.Join(ms.shims, "scp"), []byte(scpShim), 0o755))
	must(t, os.WriteFile(filepath.Join(ms.shims, "systemctl"), []byte(systemctlShim), 0o755))
	for _, d := range machineDirs {
		if _, err := os.Stat(d.path); os.IsNotExist(err) {
			must(t, os.MkdirAll(d.path, 0o755))
			ms.made = append(ms.made, d.path)
		}
	}
	must(t, ipCmd("link", "add", ms.bridge, "type", "bridge"))
	must(t, ipCmd("addr", "add", fmt.Sprintf("10.66.%d.1/24", subnet), "dev", ms.bridge))
	must(t, ipCmd("link", "set", ms.bridge, "up"))
	hosts := "127.0.0.1 localhost\n"
	for i, n := range names {
		m := &machine{name: n, ns: "vmd" + tag + n, addr: fmt.Sprintf("10.66.%d.%d", subnet, 11+i), dir: filepath.Join(ms.root, n)}
		hosts += m.addr + " " + n + "\n"
		ms.byName[n] = m
		ms.order = append(ms.order, m)
		out, in := "vmd"+tag+n+"a", "vmd"+tag+n+"b"
		for _, s := range [][]string{
			{"netns", "add", m.ns},
			{"link", "add", out, "type", "veth", "peer", "name", in},
			{"link", "set", in, "netns", m.ns},
			{"link", "set", out, "master", ms.bridge},
			{"link", "set", out, "up"},
			{"-n", m.ns, "link", "set", "lo", "up"},
			{"-n", m.ns, "addr", "add", m.addr + "/24", "dev", in},
			{"-n", m.ns, "link", "set", in, "up"},
		} {
			must(t, ipCmd(s...))
		}
	}
	for _, m := range ms.order {
		for _, d := range append([]string{"home", "run"}, keys()...) {
			must(t, os.MkdirAll(filepath.Join(m.dir, d), 0o755))
		}
		must(t, os.WriteFile(filepath.Join(m.dir, "hosts"), []byte(hosts), 0o644))
		for _, u := range []string{"vmherd-engine", "vmherd-worker"} {
			ms.notifyListener(filepath.Join(m.dir, "run", u+".service"))
		}
		var binds []string
		for _, d := range machineDirs {
			binds = append(binds, fmt.Sprintf("mount --bind %q %q", filepath.Join(m.dir, d.key), d.path))
		}
		binds = append(binds, fmt.Sprintf("mount --bind %q /etc/hosts", filepath.Join(m.dir, "hosts")))
		script := strings.Join(binds, " && ") + fmt.Sprintf(" && hostname %s && cd %q && exec bash --noprofile --norc", m.name, filepath.Join(m.dir, "home"))
		m.cmd = exec.Command("ip", "netns", "exec", m.ns, "unshare", "--mount", "--uts", "--propagation", "private", "bash", "--noprofile", "--norc", "-c", script)
		m.cmd.Env = ms.env(m, nil)
		ms.startShell(m)
	}
	// The workstation: the repository, this machine's network and files.
	w := &machine{name: "workstation", dir: filepath.Join(ms.root, "workstation")}
	must(t, os.MkdirAll(w.dir, 0o755))
	w.cmd = exec.Command("bash", "--noprofile", "--norc")
	w.cmd.Dir = ws.repo
	w.cmd.Env = ms.env(w, ws.env)
	ms.startShell(w)
	ms.byName[w.name] = w
	return ms
}

type wsConfig struct {
	repo string
	env  []string
}

func keys() []string {
	var k []string
	for _, d := range machineDirs {
		k = append(k, d.key)
	}
	return k
}

func (ms *machines) env(m *machine, extra []string) []string {
	path := ms.shims + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	if m.name == "workstation" {
		path = ms.shims + ":" + os.Getenv("PATH")
	}
	home := filepath.Join(m.dir, "home")
	if m.name == "workstation" {
		home = m.dir
	}
	env := []string{"PATH=" + path, "HOME=" + home, "LANG=C.UTF-8", "TERM=dumb",
		"VMHERD_DOCTEST_ROOT=" + ms.root, "VMHERD_DOCTEST_RUN=" + filepath.Join(m.dir, "run")}
	for _, k := range []string{"GOPATH", "GOCACHE", "GOMODCACHE", "GOFLAGS", "GOPROXY", "GOTOOLCHAIN"} {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}
	if m.name == "workstation" {
		if _, ok := os.LookupEnv("GOCACHE"); !ok {
			out, _ := exec.Command("go", "env", "GOCACHE", "GOPATH").Output()
			if f := strings.Fields(string(out)); len(f) == 2 {
				env = append(env, "GOCACHE="+f[0], "GOPATH="+f[1])
			}
		}
	}
	return append(env, extra...)
}

// notifyListener stands in for systemd's notify socket of a unit: on
// READY=1 it writes <unit>.ready for the systemctl shim.
func (ms *machines) notifyListener(unit string) {
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: unit + ".notify", Net: "unixgram"})
	must(ms.t, err)
	ms.t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			for _, l := range strings.Split(string(buf[:n]), "\n") {
				if l == "READY=1" {
					_ = os.WriteFile(unit+".ready", nil, 0o644)
				}
			}
		}
	}()
}

func (ms *machines) startShell(m *machine) {
	t := ms.t
	in, err := m.cmd.StdinPipe()
	must(t, err)
	r, w, err := os.Pipe()
	must(t, err)
	m.cmd.Stdout, m.cmd.Stderr = w, w
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	must(t, m.cmd.Start())
	w.Close()
	m.in = in
	m.lines = make(chan string, 1024)
	go func() {
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			m.lines <- sc.Text()
		}
		close(m.lines)
	}()
}

// run runs one line in the machine's shell, and returns its output and
// exit code (-1: it did not finish within timeout).
func (m *machine) run(line string, timeout time.Duration) (string, int) {
	var b [6]byte
	_, _ = rand.Read(b[:])
	marker := "__rc_" + hex.EncodeToString(b[:])
	fmt.Fprintf(m.in, "{ %s\n} </dev/null 2>&1; echo %s $?\n", line, marker)
	var out strings.Builder
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-m.lines:
			if !ok {
				return out.String() + "(the shell ended)", -1
			}
			if rest, ok := strings.CutPrefix(l, marker+" "); ok {
				rc, _ := strconv.Atoi(rest)
				return out.String(), rc
			}
			out.WriteString(l + "\n")
		case <-deadline:
			return out.String() + fmt.Sprintf("(no end after %s)", timeout), -1
		}
	}
}

// log is what a unit started by the systemctl shim logged.
func (m *machine) log(unit string) string {
	b, _ := os.ReadFile(filepath.Join(m.dir, "run", unit+".service.log"))
	return string(b)
}

// rc is a unit's exit code ("" while it runs).
func (m *machine) rc(unit string) string {
	b, _ := os.ReadFile(filepath.Join(m.dir, "run", unit+".service.rc"))
	return strings.TrimSpace(string(b))
}

// down kills what the machines started (the shells, the units, the VMs)
// and removes the namespaces and links.
func (ms *machines) down() {
	for _, m := range ms.order {
		pids, _ := filepath.Glob(filepath.Join(m.dir, "run", "*.pid"))
		for _, p := range pids {
			if b, err := os.ReadFile(p); err == nil {
				if pid, _ := strconv.Atoi(strings.TrimSpace(string(b))); pid > 1 {
					_ = syscall.Kill(-pid, syscall.SIGKILL)
				}
			}
		}
		// VMs outlive their worker (KillMode=process): their pidfiles.
		vmpids, _ := filepath.Glob(filepath.Join(m.dir, "var", "worker", "vms", "*", "*.pid"))
		for _, p := range vmpids {
			b, err := os.ReadFile(p)
			pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil || pid <= 1 {
				continue
			}
			if cl, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && strings.Contains(string(cl), "qemu") {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	for _, m := range ms.byName {
		if m.cmd != nil && m.cmd.Process != nil {
			_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
			_ = m.cmd.Wait()
		}
	}
	for _, m := range ms.order {
		_ = ipCmd("netns", "del", m.ns)
	}
	_ = ipCmd("link", "del", ms.bridge)
	for _, d := range ms.made {
		_ = os.Remove(d)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

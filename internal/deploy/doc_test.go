package deploy_test

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/testenv/require"
)

// docBlock is one sh block of docs/deploy.md's walk-through: the
// machines it runs on and its lines.
type docBlock struct {
	on    []string
	lines []docLine
}

type docLine struct {
	text  string
	fails bool // marked "# fails": must exit non-zero
}

var onLine = regexp.MustCompile(`^# on (.+)$`)

// deploySection reads the sh blocks of a section of docs/deploy.md.
func deploySection(t *testing.T, root, title string) []docBlock {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "docs", "deploy.md"))
	must(t, err)
	_, sec, ok := strings.Cut(string(b), "\n## "+title+"\n")
	if !ok {
		t.Fatalf("docs/deploy.md has no section %q", title)
	}
	if i := strings.Index(sec, "\n## "); i >= 0 {
		sec = sec[:i]
	}
	comment := regexp.MustCompile(`\s{2,}#\s*(.*)$`)
	var blocks []docBlock
	var cur *docBlock
	sc := bufio.NewScanner(strings.NewReader(sec))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "```sh":
			cur = &docBlock{}
			continue
		case line == "```" && cur != nil:
			blocks = append(blocks, *cur)
			cur = nil
			continue
		case cur == nil || strings.TrimSpace(line) == "":
			continue
		}
		if m := onLine.FindStringSubmatch(line); m != nil && cur.on == nil && len(cur.lines) == 0 {
			for _, f := range strings.FieldsFunc(strings.ReplaceAll(m[1], " and ", ","), func(r rune) bool { return r == ',' || r == ' ' }) {
				cur.on = append(cur.on, f)
			}
			if m[1] == "your workstation" {
				cur.on = []string{"workstation"}
			}
			continue
		}
		if cur.on == nil {
			t.Fatalf("docs/deploy.md: a block's first line must say where it runs (# on m1): %q", line)
		}
		l := docLine{}
		if m := comment.FindStringSubmatchIndex(line); m != nil {
			l.fails = strings.HasPrefix(line[m[2]:m[3]], "fails")
			line = line[:m[0]]
		}
		l.text = strings.TrimSpace(line)
		cur.lines = append(cur.lines, l)
	}
	return blocks
}

// TestDeployDoc follows docs/deploy.md's walk-through on three machines
// (network namespaces with their own vmherd directories): init, the NATS
// cluster from the generated configurations, two engines, two hosts
// joining with tokens, a QEMU VM started on m2 from m1, then m3's
// credentials revoked and its worker refused.
func TestDeployDoc(t *testing.T) {
	testenv.Require(t, os.Geteuid() == 0, "network and mount namespaces need root")
	for _, tool := range []string{"ip", "unshare", "qemu-system-x86_64", "qemu-img"} {
		_, err := exec.LookPath(tool)
		testenv.Require(t, err == nil, tool+" is not installed")
	}
	testenv.Tool(t, "nats-server") // scripts/package ships it
	root, err := require.RepoRoot()
	must(t, err)
	blocks := deploySection(t, root, "From nothing to a VM")
	if len(blocks) < 8 {
		t.Fatalf("docs/deploy.md's walk-through has %d sh blocks; want the install, init, copy, NATS, engines, join, vmctl and revoke steps", len(blocks))
	}
	rotation := deploySection(t, root, "Revoking and rotating a host's credentials")
	if len(rotation) != 3 {
		t.Fatalf("docs/deploy.md's rotation has %d sh blocks, want 3 (token, join and restart, revoke)", len(rotation))
	}
	bin := testenv.PlainBinaries(t)
	guest := guestimage.EnsureForTest(t)
	start := time.Now()
	ms := newMachines(t, []string{"m1", "m2", "m3"}, wsConfig{repo: root,
		env: []string{"VMHERD_PACKAGE_BIN=" + bin, "VMHERD_PACKAGE_GUEST=" + guest}})

	runBlocks := func(blocks []docBlock) bool {
		for _, b := range blocks {
			for _, on := range b.on {
				m := ms.byName[on]
				if m == nil {
					t.Fatalf("docs/deploy.md: a block runs on %q, which is not a machine of the walk-through", on)
				}
				for _, l := range b.lines {
					t0 := time.Now()
					out, rc := m.run(l.text, 3*time.Minute)
					if l.fails {
						// Retried until it fails: what it waits for (a worker
						// refused) takes a moment.
						for rc == 0 && time.Since(t0) < 20*time.Second {
							time.Sleep(500 * time.Millisecond)
							out, rc = m.run(l.text, time.Minute)
						}
					}
					t.Logf("[%s %5.1fs] $ %s (exit %d, %.1fs)\n%s", on, time.Since(start).Seconds(), l.text, rc, time.Since(t0).Seconds(), indent(out))
					if l.fails != (rc != 0) || rc < 0 {
						t.Errorf("on %s: %q exited %d (want %s)\n%s", on, l.text, rc, map[bool]string{true: "non-zero", false: "0"}[l.fails], ms.logs())
						return false
					}
				}
			}
		}
		return true
	}
	if !runBlocks(blocks) {
		return
	}

	// What the walk-through claims, checked from outside it.
	m1, m2, m3 := ms.byName["m1"], ms.byName["m2"], ms.byName["m3"]
	if out, rc := m1.run("vmctl status smoke1", time.Minute); rc != 0 || !strings.Contains(out, "running") || !strings.Contains(out, "m2") {
		t.Errorf("smoke1 is not running on m2:\n%s", out)
	}
	if rc := m3.rc("vmherd-worker"); rc != "78" {
		t.Errorf("m3's revoked worker exited %q, want 78\n%s", rc, m3.log("vmherd-worker"))
	}
	if log := m3.log("vmherd-worker"); !strings.Contains(log, "revoked") && !strings.Contains(log, "refused the credentials") {
		t.Errorf("m3's worker log does not name the revocation:\n%s", log)
	}
	for _, m := range []*machine{m1, m2} {
		if rc := m.rc("vmherd-engine"); rc != "" {
			t.Errorf("%s's engine exited %s:\n%s", m.name, rc, m.log("vmherd-engine"))
		}
	}
	if rc := m2.rc("vmherd-worker"); rc != "" {
		t.Errorf("m2's worker exited %s:\n%s", rc, m2.log("vmherd-worker"))
	}
	log := strings.TrimSpace(m3.log("vmherd-worker"))
	t.Logf("m3's worker, last line: %s", log[strings.LastIndex(log, "\n")+1:])
	t.Logf("walk-through done in %s", time.Since(start).Round(time.Second))

	// Beyond the walk-through: the revoked host's worker started again is
	// refused at once; a token works once and not after it expires.
	t0 := time.Now()
	out, rc := m3.run("worker --config /etc/vmherd/worker.toml", 30*time.Second)
	if took := time.Since(t0); rc != 78 || took > 5*time.Second || !strings.Contains(out, "refused the credentials in /etc/vmherd/worker.creds") {
		t.Errorf("the revoked host's worker started again: exit %d after %s, want 78 within 5s naming its credentials:\n%s", rc, took, out)
	} else {
		t.Logf("the revoked worker, started again, exited %d after %s: %s", rc, took.Round(time.Millisecond), strings.TrimSpace(out))
	}
	if out, rc := m2.run("ls m2.token", 10*time.Second); rc == 0 {
		t.Errorf("worker join left the used token: %s", out)
	}
	if out, rc := m2.run("scp root@m1:vmherd-fleet/join/m2.token again.token && worker join --token again.token --etc-dir again", time.Minute); rc == 0 || !strings.Contains(out, "used already") {
		t.Errorf("a used token worked again (exit %d):\n%s", rc, out)
	}
	if out, rc := m1.run("engine token --host m4 --ttl 1s -o m4.token && sleep 2 && scp m4.token root@m3: ", time.Minute); rc != 0 {
		t.Fatalf("engine token: %s", out)
	}
	if out, rc := m3.run("worker join --token m4.token --etc-dir m4", time.Minute); rc == 0 || !strings.Contains(out, "expired") {
		t.Errorf("an expired token worked (exit %d):\n%s", rc, out)
	}

	// Rotation, as the doc writes it: m2 gets a new key and keeps running;
	// its old credentials are refused from then on.
	old, err := os.ReadFile(filepath.Join(m2.dir, "etc", "worker.creds"))
	must(t, err)
	must(t, os.WriteFile(filepath.Join(m2.dir, "home", "old.creds"), old, 0o600))
	if !runBlocks(rotation) {
		return
	}
	if out, rc := m2.run("systemctl is-active vmherd-worker", 10*time.Second); rc != 0 {
		t.Errorf("m2's worker is not running after the rotation: %s\n%s", out, m2.log("vmherd-worker"))
	}
	t0 = time.Now()
	out, rc = m2.run("worker --config /etc/vmherd/worker.toml --creds old.creds", 30*time.Second)
	if rc != 78 || !strings.Contains(out, "refused the credentials in old.creds") {
		t.Errorf("m2's old credentials after the rotation: exit %d after %s, want 78:\n%s", rc, time.Since(t0), out)
	}
	if out, rc := m1.run("until vmctl hosts | grep -q '^m2 *alive'; do sleep 1; done; vmctl status smoke1", time.Minute); rc != 0 || !strings.Contains(out, "live state:  running") {
		t.Errorf("after the rotation, smoke1 on m2:\n%s", out)
	}
	t.Logf("done in %s", time.Since(start).Round(time.Second))
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	if len(s) > 4000 {
		s = "…" + s[len(s)-4000:]
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}

// logs is the tail of every unit's log, for failure messages.
func (ms *machines) logs() string {
	var b strings.Builder
	for _, m := range ms.order {
		for _, u := range []string{"vmherd-nats", "vmherd-engine", "vmherd-worker"} {
			if l := m.log(u); l != "" {
				if len(l) > 3000 {
					l = "…" + l[len(l)-3000:]
				}
				b.WriteString("--- " + m.name + " " + u + " ---\n" + l + "\n")
			}
		}
	}
	return b.String()
}

package e2e_test

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/testenv"
)

// walkthroughLine is one command of the README's walkthrough.
type walkthroughLine struct {
	text     string // as written, with bin/ pointing at the built binaries
	rejected bool   // marked "# rejected": must exit 1
	cutOff   bool   // runs until interrupted (--follow, nats sub)
}

// readmeWalkthrough returns the command blocks of the README's
// "A five-minute walkthrough" section, line by line.
func readmeWalkthrough(t *testing.T, root string) [][]walkthroughLine {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(b), "\n## A five-minute walkthrough\n")
	if !ok {
		t.Fatal("README has no walkthrough section")
	}
	if i := strings.Index(sec, "\n## "); i >= 0 {
		sec = sec[:i]
	}
	comment := regexp.MustCompile(`\s{2,}#\s*(.*)$`)
	var blocks [][]walkthroughLine
	var cur []walkthroughLine
	in := false
	sc := bufio.NewScanner(strings.NewReader(sec))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "```sh":
			in, cur = true, nil
			continue
		case line == "```" && in:
			in = false
			blocks = append(blocks, cur)
			continue
		case !in || strings.TrimSpace(line) == "":
			continue
		}
		l := walkthroughLine{}
		if m := comment.FindStringSubmatchIndex(line); m != nil {
			l.rejected = strings.HasPrefix(line[m[2]:m[3]], "rejected")
			line = line[:m[0]]
		}
		l.text = strings.TrimSpace(line)
		l.cutOff = strings.Contains(l.text, "--follow") || strings.HasPrefix(l.text, "nats sub ")
		cur = append(cur, l)
	}
	if len(blocks) != 4 {
		t.Fatalf("walkthrough has %d sh blocks, want 4 (engine, vmctl, QEMU, nats CLI)", len(blocks))
	}
	return blocks
}

// TestREADMEWalkthrough runs the README's walkthrough as a new user would:
// the engine as the first block starts it, then every other command in
// order, from the repository root, through bash.
func TestREADMEWalkthrough(t *testing.T) {
	_, err := os.Stat("/usr/bin/qemu-system-x86_64")
	testenv.Require(t, err == nil, "qemu-system-x86_64 is not installed")
	natsBin := testenv.Tool(t, "nats")
	bin := testenv.Binaries(t)
	root, err := filepath.Abs(testenv.RepoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	blocks := readmeWalkthrough(t, root)

	dir := t.TempDir()
	port := testenv.FreePort(t)
	env := []string{
		"NATS_URL=nats://" + testenv.Addr(port),
		"VMHERD_DATA_DIR=" + filepath.Join(dir, "data"), // where vmctl and the README's NATS_CREDS line look
		"PATH=" + filepath.Dir(natsBin) + ":" + os.Getenv("PATH"),
	}
	withBin := func(s string) string { return strings.ReplaceAll(s, "bin/", bin+"/") }

	// Block 1: build (done by testenv.Binaries) and start the engine.
	var engine *testenv.Proc
	for _, l := range blocks[0] {
		switch {
		case strings.HasPrefix(l.text, "go build "):
		case strings.HasPrefix(l.text, "bin/engine"):
			args := strings.Fields(l.text)[1:]
			for i, a := range args {
				if i > 0 && args[i-1] == "--image-dir" {
					args[i] = filepath.Join(root, a) // the README runs from the repo's root
				}
			}
			engine = testenv.StartProc(t, "engine", filepath.Join(bin, "engine"), []string{
				"VMHERD_LISTEN=" + testenv.Addr(port),
				"VMHERD_DATA_DIR=" + filepath.Join(dir, "data"),
			}, args...)
			engine.WaitLog("engine serving", 60*time.Second)
		default:
			t.Fatalf("unexpected line in the engine block: %q", l.text)
		}
	}
	if engine == nil {
		t.Fatal("the walkthrough never starts the engine")
	}
	t.Cleanup(func() {
		// Leave no QEMU behind when a line failed half-way.
		_ = exec.Command(filepath.Join(bin, "vmctl"), "--server", "nats://"+testenv.Addr(port), "--creds", filepath.Join(dir, "data", "auth", "admin.creds"),
			"--timeout", "1m", "destroy", "vm1").Run()
		_ = engine.Term(60 * time.Second)
	})

	// Blocks 2-4: one bash script, so variables carry over as in a
	// terminal; each line's exit code is checked where it ran.
	var script strings.Builder
	script.WriteString("cd " + shellQuote(root) + "\n")
	n := 0
	for _, blk := range blocks[1:] {
		for _, l := range blk {
			if strings.HasPrefix(l.text, "bin/vmctl console ") {
				continue // interactive: internal/vmctl's attach tests cover it
			}
			n++
			want := 0
			cmd := withBin(l.text)
			switch {
			case l.cutOff:
				want = 124
				cmd = "timeout 3 " + cmd
			case l.rejected:
				want = 1
			}
			if strings.HasPrefix(l.text, "bin/vmctl proxy ") || strings.HasPrefix(l.text, "bin/vmctl stop ") {
				// The guest's SSH port and ACPI need a booted guest: wait
				// for it as a user would.
				script.WriteString(fmt.Sprintf("for i in $(seq 180); do %s/vmctl log vm1 | grep -q VMHERD-GUEST-READY && break; sleep 1; done\n", bin))
			}
			fmt.Fprintf(&script, "echo %s\n%s\nrc=$?\nif [ $rc -ne %d ]; then echo \"README line %d exited $rc, want %d: \"%s; exit 1; fi\n",
				shellQuote("$ "+l.text), cmd, want, n, want, shellQuote(l.text))
		}
	}
	ctx := exec.Command("bash", "-c", script.String())
	ctx.Env = append(os.Environ(), env...)
	start := time.Now()
	out, err := ctx.CombinedOutput()
	t.Logf("README walkthrough: %d commands in %s\n%s", n, time.Since(start).Round(time.Second), out)
	if err != nil {
		t.Fatalf("README walkthrough failed: %v\nengine log:\n%s", err, engine.Output())
	}
	for _, want := range []string{"started", "destroyed", "already suspended", "vmherd-worker", "is not running", guestimage.SSHBanner} {
		if !strings.Contains(string(out), want) {
			t.Errorf("walkthrough output lacks %q", want)
		}
	}
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

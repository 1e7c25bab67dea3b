package e2e_test

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/testenv"
)

// The operating surface as the README shows it: the engine binary with its
// embedded NATS and a local worker, configured through VMHERD_* variables;
// vmctl driving a VM; the plain nats CLI publishing a command, watching
// events, reading the record and listing the worker's micro service; and a
// restart on the same data directory keeping everything.
func TestBinariesAndNatsCLI(t *testing.T) {
	nats := testenv.Tool(t, "nats")
	bin := testenv.Binaries(t)
	dir := t.TempDir()
	port := testenv.FreePort(t)
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	engineEnv := []string{
		"VMHERD_DATA_DIR=" + filepath.Join(dir, "data"),
		"VMHERD_LISTEN=" + testenv.Addr(port),
		"VMHERD_BACKENDS=noop",
		"VMHERD_HOST=box1",
	}
	start := func() *testenv.Proc {
		p := testenv.StartProc(t, "engine", filepath.Join(bin, "engine"), engineEnv, "--with-worker")
		p.WaitLog("engine serving", 60*time.Second)
		return p
	}
	eng := start()
	vmctl := func(args ...string) (string, string, int) {
		return testenv.Run(t, 60*time.Second, []string{"NATS_URL=" + url, "VMHERD_DATA_DIR=" + filepath.Join(dir, "data")}, filepath.Join(bin, "vmctl"), args...)
	}
	natsRun := func(args ...string) string {
		out, errOut, code := testenv.Run(t, 60*time.Second, nil, nats, append([]string{"--server", url, "--creds", filepath.Join(dir, "data", "auth", "admin.creds")}, args...)...)
		if code != 0 {
			t.Fatalf("nats %v: exit %d\n%s%s", args, code, out, errOut)
		}
		return out + errOut
	}
	// Wait for the local worker's first heartbeat.
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(natsRun("kv", "ls", "VM_HOSTS"), "box1") {
		if time.Now().After(deadline) {
			t.Fatal("worker box1 never heartbeated")
		}
		time.Sleep(100 * time.Millisecond)
	}

	out, errOut, code := vmctl("create", "web1", "--backend", "noop", "--memory", "128", "--start")
	if code != 0 || !strings.Contains(out, "started") {
		t.Fatalf("vmctl create --start: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = vmctl("suspend", "web1")
	if code != 0 || !strings.Contains(out, "suspended") {
		t.Fatalf("vmctl suspend: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = vmctl("suspend", "web1")
	if code == 0 || !strings.Contains(errOut, "rejected") || !strings.Contains(errOut, "suspended") {
		t.Fatalf("second suspend should be rejected naming the state: exit %d\n%s%s", code, out, errOut)
	}
	out, _, code = vmctl("status", "web1")
	if code != 0 || !strings.Contains(out, "live state:  suspended") {
		t.Fatalf("vmctl status: exit %d\n%s", code, out)
	}
	out, _, code = vmctl("--json", "list")
	var list []api.VmRecord
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil || len(list) != 1 || list[0].State != "suspended" {
		t.Fatalf("vmctl --json list: exit %d\n%s", code, out)
	}

	// The plain nats CLI: subscribe, publish a command, see its events.
	sub := testenv.StartProc(t, "nats-sub", nats, nil, "--server", url, "--creds", filepath.Join(dir, "data", "auth", "admin.creds"), "sub", "vm.evt.>", "--count", "2")
	sub.WaitLog("Subscribing on", 20*time.Second)
	natsRun("pub", "vm.cmd.web1.resume", `{"command_id":"from-nats-cli"}`)
	sub.WaitLog("vm.evt.web1.resumed", 30*time.Second)
	if o := sub.Output(); !strings.Contains(o, "vm.evt.web1.accepted") || !strings.Contains(o, "from-nats-cli") {
		t.Fatalf("nats sub saw:\n%s", o)
	}
	deadline = time.Now().Add(20 * time.Second)
	for !strings.Contains(natsRun("kv", "get", "VM_RECORDS", "web1", "--raw"), `"state":"running"`) {
		if time.Now().After(deadline) {
			t.Fatalf("record never read running:\n%s", natsRun("kv", "get", "VM_RECORDS", "web1", "--raw"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if o := natsRun("micro", "ls"); !strings.Contains(o, "vmherd-worker") {
		t.Fatalf("nats micro ls does not show the worker:\n%s", o)
	}
	// Another identity's nats CLI (docs/trust.md, Inboxes): `engine creds`
	// names its inbox prefix; with --inbox-prefix it reads what its role
	// may (an operator: a VM's key), without it no reply reaches it.
	natsRun("kv", "put", "VM_SSH", "web1.key", "the-private-key")
	carol := filepath.Join(dir, "carol.creds")
	_, said, code := testenv.Run(t, 30*time.Second, nil, filepath.Join(bin, "engine"), "creds", "--data-dir", filepath.Join(dir, "data"), "--role", "operator", "--name", "carol", "-o", carol)
	_, prefix, found := strings.Cut(said, "--inbox-prefix ")
	prefix, _, _ = strings.Cut(prefix, ")")
	if code != 0 || !found || prefix == "" {
		t.Fatalf("engine creds: exit %d, no inbox prefix named: %s", code, said)
	}
	get := []string{"--server", url, "--creds", carol, "--timeout", "2s", "kv", "get", "VM_SSH", "web1.key", "--raw"}
	if out, errOut, code := testenv.Run(t, 30*time.Second, nil, nats, append([]string{"--inbox-prefix", prefix}, get...)...); code != 0 || !strings.Contains(out, "the-private-key") {
		t.Errorf("nats --inbox-prefix %s kv get, as an operator: exit %d\n%s%s", prefix, code, out, errOut)
	}
	if out, _, code := testenv.Run(t, 30*time.Second, nil, nats, get...); code == 0 || strings.Contains(out, "the-private-key") {
		t.Errorf("nats kv get as an operator without its inbox prefix: exit %d\n%s", code, out)
	}

	// Malformed input through the CLI: one rejection, the engine serves on.
	natsRun("pub", "vm.cmd.web1.stop", "{oops", "-H", "Nats-Msg-Id:bad-json")

	// Restart on the same data dir: events and records are kept.
	if err := eng.Term(60 * time.Second); err != nil {
		t.Fatalf("engine did not stop cleanly: %v\n%s", err, eng.Output())
	}
	eng = start()
	// The malformed command may still wait for the restarted engine to
	// decide it (it was published just before the stop).
	decided := time.Now().Add(15 * time.Second)
	for {
		out, errOut, code = vmctl("history", "web1")
		ok := code == 0 && strings.Contains(out, "from-nats-cli") && strings.Contains(out, "bad-json") && strings.Contains(out, "JSON")
		if ok {
			break
		}
		if time.Now().After(decided) {
			t.Fatalf("history after restart: exit %d\n%s%s", code, out, errOut)
		}
		time.Sleep(500 * time.Millisecond)
	}
	out, errOut, code = vmctl("stop", "web1")
	if code != 0 || !strings.Contains(out, "stopped") {
		t.Fatalf("stop after restart: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = vmctl("destroy", "web1")
	if code != 0 || !strings.Contains(out, "destroyed") {
		t.Fatalf("destroy: exit %d\n%s%s", code, out, errOut)
	}
	if err := eng.Term(60 * time.Second); err != nil {
		t.Fatalf("engine did not stop cleanly: %v\n%s", err, eng.Output())
	}
}

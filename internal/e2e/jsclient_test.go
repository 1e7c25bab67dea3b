package e2e_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/testenv"
)

// jsExample is the JavaScript example's directory, once node and its
// packages are there (scripts/setup runs npm ci in it).
func jsExample(t *testing.T) (node, dir string) {
	t.Helper()
	node, err := exec.LookPath("node")
	testenv.Require(t, err == nil, "node is not installed")
	dir = filepath.Join(testenv.RepoRoot(t), "examples", "js")
	b, err := os.ReadFile(filepath.Join(dir, "package.json"))
	if err != nil {
		t.Fatal(err)
	}
	var pkg struct{ Dependencies map[string]string }
	if err := json.Unmarshal(b, &pkg); err != nil || len(pkg.Dependencies) == 0 {
		t.Fatalf("examples/js/package.json names no dependencies (%v)", err)
	}
	for name, version := range pkg.Dependencies {
		b, err := os.ReadFile(filepath.Join(dir, "node_modules", name, "package.json"))
		var got struct{ Version string }
		if err == nil {
			err = json.Unmarshal(b, &got)
		}
		testenv.Require(t, err == nil && got.Version == version,
			"examples/js/node_modules has no "+name+" "+version+" (npm ci in examples/js)")
	}
	return node, dir
}

// TestJSClientLifecycle runs examples/js/lifecycle.mjs, a client that is
// not vmherd's (the official JavaScript NATS client), as an operator
// against an engine with auth on: it must drive a VM through prepare,
// start, stop and destroy with what docs/other-languages.md says (the
// issuer token and inbox prefix from the credentials, JetStream publish
// with the message id, the events read by direct gets, the record from
// VM_RECORDS). The streams then show every step, issued by the operator.
func TestJSClientLifecycle(t *testing.T) {
	node, dir := jsExample(t)
	url, data, env := authEngine(t)
	creds := filepath.Join(t.TempDir(), "jsdemo.creds")
	engine := filepath.Join(testenv.Binaries(t), "engine")
	if out, errOut, code := testenv.Run(t, 30*time.Second, nil, engine, "creds", "--data-dir", data, "--role", "operator", "--name", "jsdemo", "-o", creds); code != 0 {
		t.Fatalf("engine creds: exit %d\n%s%s", code, out, errOut)
	}

	const name = "jsvm"
	t0 := time.Now()
	out, errOut, code := testenv.Run(t, 2*time.Minute, []string{"NATS_URL=" + url, "NATS_CREDS=" + creds},
		node, filepath.Join(dir, "lifecycle.mjs"), name)
	t.Logf("node lifecycle.mjs: exit %d in %s", code, time.Since(t0).Round(time.Millisecond))
	if code != 0 || !strings.Contains(out, name+": prepared, running, stopped, destroyed") {
		t.Fatalf("node lifecycle.mjs: exit %d\n%s%s", code, out, errOut)
	}
	if !strings.Contains(out, "inbox prefix _INBOX_VMHERD.operator.jsdemo") {
		t.Errorf("the example did not take its inbox prefix from the credentials:\n%s", out)
	}

	// The events, read from the stream: each command accepted by an
	// engine with the operator as its issuer, then its result from h1's
	// worker, and the example printed each of them.
	printed := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 2 && f[0] == "event" {
			printed[f[1]+" "+f[2]] = true
		}
	}
	want := []struct {
		action string
		result api.EventType
		state  api.VmState
	}{
		{"prepare", api.TypePrepared, api.StatePrepared},
		{"start", api.TypeStarted, api.StateRunning},
		{"stop", api.TypeStopped, api.StateStopped},
		{"destroy", api.TypeDestroyed, api.StateDestroyed},
	}
	evs := env.Events(name)
	if len(evs) != 2*len(want) {
		t.Fatalf("%d events of %s, want %d (an accepted and a result per command): %+v", len(evs), name, 2*len(want), evs)
	}
	var ids []string
	for i, w := range want {
		acc, res := evs[2*i], evs[2*i+1]
		if acc.Event == nil || res.Event == nil {
			t.Fatalf("undecodable event at %d or %d", acc.Seq, res.Seq)
		}
		a, r := acc.Event, res.Event
		switch {
		case a.Type != api.TypeAccepted || string(a.Action) != w.action || !a.FromEngine():
			t.Errorf("event %d: %s %s by %s, want %s accepted by the engine", acc.Seq, a.Type, a.Action, a.Writer, w.action)
		case a.Issuer != "jsdemo":
			t.Errorf("event %d: %s issued by %q, want the operator jsdemo", acc.Seq, w.action, a.Issuer)
		case !strings.HasPrefix(a.CommandID, "js-"):
			t.Errorf("event %d: command id %q is not the example's", acc.Seq, a.CommandID)
		case r.Type != w.result || r.State != w.state || r.CommandID != a.CommandID || r.Writer != "h1" || r.AcceptedSeq != acc.Seq:
			t.Errorf("event %d: %s (%s) of command %s by %s answering %d, want %s (%s) of %s by h1 answering %d",
				res.Seq, r.Type, r.State, r.CommandID, r.Writer, r.AcceptedSeq, w.result, w.state, a.CommandID, acc.Seq)
		}
		for _, s := range []events.Stored{acc, res} {
			if key := strconv.FormatUint(s.Seq, 10) + " " + string(s.Event.Type); !printed[key] {
				t.Errorf("the example did not print event %s:\n%s", key, out)
			}
		}
		ids = append(ids, a.CommandID)
	}

	// The commands as stored: on the operator's issuer subject, with
	// <vm>/<command id> as their message id.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmds, err := env.JS.Stream(ctx, env.Names.CommandsStream())
	if err != nil {
		t.Fatal(err)
	}
	var seq uint64 = 1
	for i, w := range want {
		m, err := cmds.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(env.Names.Command(name, ">")))
		if err != nil {
			t.Fatalf("command %d (%s) of %s in %s: %v", i, w.action, name, env.Names.CommandsStream(), err)
		}
		seq = m.Sequence + 1
		if subj := env.Names.IssuedCommand(name, w.action, "jsdemo"); m.Subject != subj {
			t.Errorf("command %d stored on %s, want %s", m.Sequence, m.Subject, subj)
		}
		if got, want := m.Header.Get("Nats-Msg-Id"), api.CommandMsgID(name, ids[i]); got != want {
			t.Errorf("command %d has Nats-Msg-Id %q, want %q", m.Sequence, got, want)
		}
	}
	if m, err := cmds.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(env.Names.Command(name, ">"))); !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Errorf("a command after the example's four: %v %v", m, err)
	}

	// The record it read: destroyed now, by its last command.
	kv, err := env.JS.KeyValue(ctx, env.Names.RecordsBucket())
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := api.UnmarshalRecord(e.Value())
	if err != nil {
		t.Fatal(err)
	}
	if rec.State != api.StateDestroyed || rec.LastCommandID != ids[len(ids)-1] || rec.LastSeq != evs[len(evs)-1].Seq {
		t.Errorf("record of %s: %s", name, e.Value())
	}
	if !strings.Contains(out, `"state":"running"`) {
		t.Errorf("the example did not print the running record:\n%s", out)
	}
	if c := env.CheckStreams(); c.Lost != 0 || c.Duplicates != 0 {
		t.Errorf("streams: %s", c)
	}
}

// TestJSExampleInDocs keeps docs/other-languages.md in step with the
// example it explains: every JavaScript block of the page is a part of
// examples/js/lifecycle.mjs, as it is there.
func TestJSExampleInDocs(t *testing.T) {
	root := testenv.RepoRoot(t)
	doc, err := os.ReadFile(filepath.Join(root, "docs", "other-languages.md"))
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile(filepath.Join(root, "examples", "js", "lifecycle.mjs"))
	if err != nil {
		t.Fatal(err)
	}
	blocks := 0
	for rest := string(doc); ; {
		_, after, ok := strings.Cut(rest, "\n```js\n")
		if !ok {
			break
		}
		block, tail, ok := strings.Cut(after, "\n```\n")
		if !ok {
			t.Fatal("docs/other-languages.md: a ```js block is not closed")
		}
		rest = "\n" + tail
		blocks++
		if !strings.Contains(string(src), block+"\n") {
			t.Errorf("docs/other-languages.md: this block is not in examples/js/lifecycle.mjs as it is:\n%s", block)
		}
	}
	if blocks < 4 {
		t.Errorf("docs/other-languages.md has %d ```js blocks; want the credentials, the publish, the wait and the record", blocks)
	}
}

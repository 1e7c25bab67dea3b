package auth_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/auth"
)

// cell is one question the matrix asks of every identity: may it do this?
type cell struct {
	family string // what is tried, e.g. "publish a command as alice"
	// kind and subject: the permission list (pub or sub) and the subject
	// the attempt uses, for the check that every permission an identity
	// holds is exercised by some cell.
	kind, subject string
	allow         []string // the identities expected to succeed
	run           func(c *client) bool
}

// Identity names (auth.Identity.Name) of the matrix's rows.
const (
	admin, engine, alice, dash, w1, w2 = "admin", "engine", "alice", "dash", "worker-h1", "worker-h2"
)

var adm = []string{admin, engine}

func plus(names ...string) []string { return append(slices.Clone(adm), names...) }

func pubCell(family, subject string, allow []string) cell {
	return cell{family: family, kind: "pub", subject: subject, allow: allow, run: func(c *client) bool {
		m := nats.NewMsg(subject)
		m.Data = []byte("{}")
		return c.pub(m)
	}}
}

func subCell(family, subject string, allow []string) cell {
	return cell{family: family, kind: "sub", subject: subject, allow: allow, run: func(c *client) bool { return c.sub(subject) }}
}

// apiCell sends a JetStream API request: allowed means the server did not
// refuse the publish (the API may still answer with an error, e.g. a stream
// update with an empty configuration: the bodies are chosen to change
// nothing when allowed).
func apiCell(family, subject string, body string, allow []string) cell {
	return cell{family: family, kind: "pub", subject: subject, allow: allow, run: func(c *client) bool {
		_, ok := c.request(subject, []byte(body))
		return ok
	}}
}

// The installation's streams and buckets, and who may read each one's
// messages (direct and API gets).
var streamReaders = map[string][]string{
	"VM_COMMANDS":   adm,
	"VM_EVENTS":     plus(alice, dash, w1, w2),
	"VM_TASKS":      adm,
	"KV_VM_RECORDS": plus(alice, dash, w1, w2),
	"KV_VM_HOSTS":   plus(alice, dash),
	"KV_VM_IMAGES":  plus(alice, dash, w1, w2),
	"KV_VM_SSH":     plus(alice),
}

// peopleRead are the streams people read (jspolicy: ordered consumers
// only).
var peopleRead = []string{"VM_EVENTS", "KV_VM_RECORDS", "KV_VM_HOSTS", "KV_VM_IMAGES", "KV_VM_SSH"}

func streamNames() []string {
	var s []string
	for k := range streamReaders {
		s = append(s, k)
	}
	sort.Strings(s)
	return s
}

// sample is a subject of each stream, for direct gets by subject.
var sample = map[string]string{
	"VM_COMMANDS": "vm.cmd.web1.start", "VM_EVENTS": "vm.evt.web1.started._engine", "VM_TASKS": "vm.task.h1.web1",
	"KV_VM_RECORDS": "$KV.VM_RECORDS.web1", "KV_VM_HOSTS": "$KV.VM_HOSTS.h1", "KV_VM_IMAGES": "$KV.VM_IMAGES.h1.img",
	"KV_VM_SSH": "$KV.VM_SSH.web1.key",
}

func cells(f *fixture) []cell {
	var cs []cell
	add := func(c ...cell) { cs = append(cs, c...) }

	// Core subjects: commands, events, tasks, bucket writes, the relay.
	add(
		pubCell("publish a command without issuer", "vm.cmd.web1.start", adm),
		pubCell("publish a command as alice", "vm.cmd.web1.start.alice", plus(alice)),
		pubCell("publish a command as bob", "vm.cmd.web1.start.bob", adm),
		// purge: a command like the others.
		pubCell("publish a purge without issuer", "vm.cmd.web1.purge", adm),
		pubCell("publish a purge as alice", "vm.cmd.web1.purge.alice", plus(alice)),
		pubCell("publish a purge as bob", "vm.cmd.web1.purge.bob", adm),
		pubCell("write an event as the engines", "vm.evt.web1.started._engine", adm),
		pubCell("write an event as h1", "vm.evt.web1.started.h1", plus(w1)),
		pubCell("write an event as h2", "vm.evt.web1.started.h2", plus(w2)),
		pubCell("write a host event", "vm.host.h1.lost", adm),
		pubCell("queue a task", "vm.task.h1.web1", adm),
		pubCell("heartbeat as h1", "$KV.VM_HOSTS.h1", plus(w1)),
		pubCell("heartbeat as h2", "$KV.VM_HOSTS.h2", plus(w2)),
		pubCell("cordon h1", "$KV.VM_HOSTS.h1.cordon", plus(alice)),
		pubCell("write a record", "$KV.VM_RECORDS.web1", adm),
		cell{family: "delete a record (a purge's fold)", kind: "pub", subject: "$KV.VM_RECORDS.web1", allow: adm, run: func(c *client) bool {
			m := nats.NewMsg("$KV.VM_RECORDS.web1")
			m.Header.Set("KV-Operation", "DEL")
			return c.pub(m)
		}},
		pubCell("write h1's image status", "$KV.VM_IMAGES.h1.img", plus(w1)),
		pubCell("write h2's image status", "$KV.VM_IMAGES.h2.img", plus(w2)),
		pubCell("write a VM's key", "$KV.VM_SSH.web1.key", plus(alice)),
		pubCell("attach to a console", "vm.console.h1.web1.attach", plus(alice)),
		pubCell("type into a console", "vm.console.h1.web1.in", plus(alice)),
		pubCell("ask for a console log", "vm.log.h1.web1", plus(alice, dash)),
		pubCell("ask a worker's query", "vm.query.h1.state", plus(alice, dash)),
		pubCell("ask a worker's stats query", "vm.query.h1.stats", plus(alice, dash)),
		pubCell("ask for an image pull", "vm.image.h1.pull", plus(alice)),
		pubCell("ask for an image removal", "vm.image.h1.rm", plus(alice)),
		pubCell("ack a command", "$JS.ACK.VM_COMMANDS.engine.1.1.1.1.0", adm),
		pubCell("ping the micro services", "$SRV.PING", adm),
		pubCell("forge an API audit advisory", "$JS.EVENT.ADVISORY.API", adm),
		pubCell("answer on NATS's default inbox", "_INBOX.x", plus(w1, w2)),
	)
	add(
		subCell("read commands", "vm.cmd.>", adm),
		subCell("read events (core)", "vm.evt.>", adm),
		subCell("read h1's tasks (core)", "vm.task.h1.>", adm),
		subCell("answer micro service discovery", "$SRV.PING", plus(w1, w2)),
		subCell("answer discovery for h1's worker service", "$SRV.INFO.vmherd-worker-h1", plus(w1)),
		subCell("answer discovery for h1's worker service by id", "$SRV.PING.vmherd-worker-h1.abc", plus(w1)),
		subCell("answer discovery for h2's worker service", "$SRV.INFO.vmherd-worker-h2", plus(w2)),
		subCell("answer discovery for h2's worker service by id", "$SRV.STATS.vmherd-worker-h2.abc", plus(w2)),
		subCell("answer service info requests", "$SRV.INFO", plus(w1, w2)),
		subCell("answer service stats requests", "$SRV.STATS", plus(w1, w2)),
		subCell("answer discovery for any service", "$SRV.>", adm),
		subCell("read VM_SSH writes (core)", "$KV.VM_SSH.>", adm),
		subCell("read heartbeats (core)", "$KV.VM_HOSTS.>", adm),
		subCell("read the API audit", "$JS.EVENT.ADVISORY.API", adm),
		subCell("read every default inbox", "_INBOX.>", adm),
		subCell("read every identity's inbox", auth.InboxRoot+".>", adm),
	)
	// What the worker of each host relays and answers, and nothing of
	// the other host's.
	for _, h := range []string{"h1", "h2"} {
		w := plus("worker-" + h)
		add(
			pubCell("publish "+h+"'s console output", "vm.console."+h+".web1.out", w),
			pubCell("open a tunnel on "+h, "vm.tunnel."+h+".web1.t1.open", plus(alice)),
			pubCell("send into a tunnel on "+h, "vm.tunnel."+h+".web1.t1.up", plus(alice)),
			pubCell("send out of "+h+"'s tunnel", "vm.tunnel."+h+".web1.t1.down", w),
			pubCell("ack "+h+"'s task", "$JS.ACK.VM_TASKS.worker-"+h+".1.1.1.1.0", w),
			subCell("take "+h+"'s console attaches", "vm.console."+h+".*.attach", w),
			subCell("read "+h+"'s console input", "vm.console."+h+".web1.in", w),
			subCell("watch a console on "+h, "vm.console."+h+".web1.out", plus(alice)),
			subCell("take "+h+"'s tunnel opens", "vm.tunnel."+h+".web1.t1.open", w),
			subCell("read into "+h+"'s tunnels", "vm.tunnel."+h+".web1.t1.up", w),
			subCell("read out of a tunnel on "+h, "vm.tunnel."+h+".web1.t1.down", plus(alice)),
			subCell("take "+h+"'s log requests", "vm.log."+h+".web1", w),
			subCell("answer "+h+"'s queries", "vm.query."+h+".state", w),
			subCell("answer "+h+"'s stats queries", "vm.query."+h+".stats", w),
			subCell("take "+h+"'s image pulls", "vm.image."+h+".pull", w),
			subCell("take "+h+"'s image removals", "vm.image."+h+".rm", w),
		)
	}
	// Inboxes: each identity reads only its own; only responders (workers)
	// may publish into others'.
	for _, id := range identities {
		p := id.InboxPrefix()
		add(subCell("read "+id.Name()+"'s inbox", p+".>", plus(id.Name())),
			pubCell("publish into "+id.Name()+"'s inbox", p+".x", plus(w1, w2)))
	}

	// Joining (package join): a host's request, its answer. Only the
	// join service's own credentials (TestJoinIdentities) and the full
	// roles take part; a worker may answer requesters' inboxes, but not a
	// joining host's.
	add(pubCell("ask to join as h3", "vmherd.join.h3", adm),
		subCell("take join requests", "vmherd.join.*", adm),
		subCell("hear a joining host's answer", "_INBOX_VMHERD.join.h3.>", adm),
		pubCell("answer a joining host", "_INBOX_VMHERD.join.h3.x", adm))

	// The JetStream API, on every stream and bucket.
	add(apiCell("account info", "$JS.API.INFO", "", plus(alice, dash, w1, w2)),
		apiCell("list streams", "$JS.API.STREAM.LIST", "", adm),
		apiCell("list stream names", "$JS.API.STREAM.NAMES", "", adm),
		apiCell("the engine consumer's info (is an engine running?)", "$JS.API.CONSUMER.INFO.VM_COMMANDS.engine", "", plus(alice, dash)),
		apiCell("bind to h1's task consumer", "$JS.API.CONSUMER.INFO.VM_TASKS.worker-h1", "", plus(w1)),
		apiCell("bind to h2's task consumer", "$JS.API.CONSUMER.INFO.VM_TASKS.worker-h2", "", plus(w2)),
		apiCell("pull h1's tasks", "$JS.API.CONSUMER.MSG.NEXT.VM_TASKS.worker-h1", `{"batch":1,"no_wait":true}`, plus(w1)),
		apiCell("pull h2's tasks", "$JS.API.CONSUMER.MSG.NEXT.VM_TASKS.worker-h2", `{"batch":1,"no_wait":true}`, plus(w2)),
	)
	for _, st := range streamNames() {
		readers := streamReaders[st]
		consumers := adm
		if st == "VM_EVENTS" {
			consumers = plus(alice, dash)
		}
		add(
			apiCell("stream info", "$JS.API.STREAM.INFO."+st, "", plus(alice, dash, w1, w2)),
			apiCell("direct get", "$JS.API.DIRECT.GET."+st, `{"seq":1}`, readers),
			apiCell("direct get by subject", "$JS.API.DIRECT.GET."+st+"."+sample[st], "", readers),
			apiCell("message get", "$JS.API.STREAM.MSG.GET."+st, `{"seq":1}`, readers),
			// Admin verbs, with bodies that change nothing if allowed.
			apiCell("create the stream", "$JS.API.STREAM.CREATE."+st, `{}`, adm),
			apiCell("update the stream", "$JS.API.STREAM.UPDATE."+st, `{}`, adm),
			apiCell("purge the stream", "$JS.API.STREAM.PURGE."+st, `{"filter":"nothing.matches"}`, adm),
			apiCell("delete a message", "$JS.API.STREAM.MSG.DELETE."+st, `{"seq":999999999}`, adm),
			apiCell("snapshot the stream", "$JS.API.STREAM.SNAPSHOT."+st, `{}`, adm),
			apiCell("restore the stream", "$JS.API.STREAM.RESTORE."+st, `{}`, adm),
			apiCell("list consumers", "$JS.API.CONSUMER.LIST."+st, "", adm),
			apiCell("list consumer names", "$JS.API.CONSUMER.NAMES."+st, "", adm),
			apiCell("create a consumer (legacy ephemeral form)", "$JS.API.CONSUMER.CREATE."+st, `{}`, adm),
			apiCell("create a durable (legacy form)", "$JS.API.CONSUMER.DURABLE.CREATE."+st+".probe", `{}`, adm),
			apiCell("create a consumer", "$JS.API.CONSUMER.CREATE."+st+".probe",
				fmt.Sprintf(`{"stream_name":%q,"config":{"name":"probe","ack_policy":"explicit","inactive_threshold":60000000000}}`, st), consumers),
			apiCell("create a filtered consumer", "$JS.API.CONSUMER.CREATE."+st+".probe."+sample[st],
				fmt.Sprintf(`{"stream_name":%q,"config":{"name":"probe","filter_subject":%q,"ack_policy":"explicit","inactive_threshold":60000000000}}`, st, sample[st]), consumers),
			apiCell("another's consumer's info", "$JS.API.CONSUMER.INFO."+st+".victim", "", consumers),
			apiCell("pull from another's consumer", "$JS.API.CONSUMER.MSG.NEXT."+st+".victim", `{"batch":1,"no_wait":true}`, consumers),
			deleteCell(f, st),
			streamDeleteCell(f, st),
			pushCell(f, st),
		)
		if slices.Contains(peopleRead, st) {
			add(durableCell(f, st))
		}
	}
	// Rollups: a put with Nats-Rollup: all on a subject one may write
	// would purge every other key of the bucket (or the stream).
	for _, subj := range []string{"$KV.VM_HOSTS.h1", "$KV.VM_HOSTS.h2", "$KV.VM_HOSTS.h1.cordon", "$KV.VM_IMAGES.h1.img", "$KV.VM_IMAGES.h2.img",
		"$KV.VM_SSH.web1.key", "$KV.VM_RECORDS.web1", "vm.evt.web1.started.h1", "vm.evt.web1.started._engine", "vm.cmd.web1.start.alice", "vm.task.h1.web1"} {
		add(rollupCell(f, subj))
	}
	return cs
}

// victim names the consumer on st that the matrix's identities try to
// reach: another identity's (an engine's or a reader's ordered consumer,
// on the streams people read; a durable elsewhere).
func (f *fixture) victim(st string) {
	f.t.Helper()
	cfg := jetstream.ConsumerConfig{Name: "victim", AckPolicy: jetstream.AckExplicitPolicy, InactiveThreshold: 10 * time.Minute}
	if !slices.Contains(peopleRead, st) {
		cfg = jetstream.ConsumerConfig{Durable: "victim", AckPolicy: jetstream.AckExplicitPolicy, FilterSubject: "vm.nothing.>"}
		if st == "VM_TASKS" {
			cfg.FilterSubject = "vm.task.nohost.>"
		}
		if st == "VM_COMMANDS" {
			cfg.FilterSubject = "vm.cmd.novm.>"
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := f.admin.js.CreateOrUpdateConsumer(ctx, st, cfg); err != nil {
		f.t.Fatalf("creating the victim consumer on %s: %v", st, err)
	}
}

// exists reports whether consumer name is on st.
func (f *fixture) exists(st, name string) bool {
	m, ok := f.admin.request("$JS.API.CONSUMER.INFO."+st+"."+name, nil)
	if !ok || m == nil {
		f.t.Fatalf("admin cannot read consumer info on %s", st)
	}
	var r struct {
		Error *struct{ Code int } `json:"error"`
	}
	_ = json.Unmarshal(m.Data, &r)
	return r.Error == nil
}

// deleteCell: deleting another identity's consumer.
func deleteCell(f *fixture, st string) cell {
	subject := "$JS.API.CONSUMER.DELETE." + st + ".victim"
	return cell{family: "delete another's consumer", kind: "pub", subject: subject, allow: adm, run: func(c *client) bool {
		_, ok := c.request(subject, nil)
		deleted := !f.exists(st, "victim")
		if deleted {
			f.victim(st)
		}
		return ok && deleted
	}}
}

// streamDeleteCell: deleting the stream. An allowed identity deletes a
// scratch stream of the same permissions' shape instead (admin and engine
// may publish anything); the others try the real one.
func streamDeleteCell(f *fixture, st string) cell {
	subject := "$JS.API.STREAM.DELETE." + st
	return cell{family: "delete the stream", kind: "pub", subject: subject, allow: adm, run: func(c *client) bool {
		if c.id.Role == auth.RoleAdmin || c.id.Role == auth.RoleEngine {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := f.admin.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: "SCRATCH", Subjects: []string{"scratch.>"}}); err != nil {
				f.t.Fatal(err)
			}
			_, ok := c.request("$JS.API.STREAM.DELETE.SCRATCH", nil)
			return ok
		}
		_, ok := c.request(subject, nil)
		return ok
	}}
}

// pushCell: a consumer delivering the stream's messages to a subject the
// creator may not publish to (a VM's console input). The server cannot be
// told to refuse it (the deliver subject is in the body); the engines'
// policy deletes it. Allowed means it still exists 3 s later.
func pushCell(f *fixture, st string) cell {
	return cell{family: "keep a push consumer delivering to a console", kind: "push", allow: nil, run: func(c *client) bool {
		name := "push-" + c.id.Name()
		body := fmt.Sprintf(`{"stream_name":%q,"config":{"name":%q,"deliver_subject":"vm.console.h1.web1.in","ack_policy":"none"}}`, st, name)
		if m, ok := c.request("$JS.API.CONSUMER.CREATE."+st+"."+name, []byte(body)); !ok || m == nil || strings.Contains(string(m.Data), `"error"`) {
			return false
		}
		for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if !f.exists(st, name) {
				return false
			}
		}
		return true
	}}
}

// durableCell: a durable consumer on a stream people read (permissions
// cannot tell it from an ordered consumer); allowed means it still exists
// 3 s later.
func durableCell(f *fixture, st string) cell {
	return cell{family: "keep a durable consumer", kind: "push", allow: nil, run: func(c *client) bool {
		name := "durable-" + c.id.Name()
		body := fmt.Sprintf(`{"stream_name":%q,"config":{"durable_name":%q,"name":%q,"ack_policy":"explicit"}}`, st, name, name)
		if m, ok := c.request("$JS.API.CONSUMER.CREATE."+st+"."+name, []byte(body)); !ok || m == nil || strings.Contains(string(m.Data), `"error"`) {
			return false
		}
		for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if !f.exists(st, name) {
				return false
			}
		}
		return true
	}}
}

// rollupCell: a put with Nats-Rollup: all on subj; allowed means the
// stream took it.
func rollupCell(f *fixture, subj string) cell {
	return cell{family: "roll up (Nats-Rollup: all)", kind: "rollup", subject: subj, allow: nil, run: func(c *client) bool {
		if !c.pub(&nats.Msg{Subject: subj, Data: []byte("{}")}) {
			return false // may not write there at all
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		m := nats.NewMsg(subj)
		m.Data = []byte("{}")
		m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupAll)
		_, err := c.js.PublishMsg(ctx, m)
		return err == nil
	}}
}

// The permission matrix: every identity of every role against every
// subject family, stream, bucket, JetStream API verb, rollup, push deliver
// subject and inbox, checked against a real server with the engines'
// consumer policy running. Each permission an identity holds must be
// exercised by a cell expecting it, so a new permission (or role) cannot
// open a hole unnoticed.
func TestPermissionMatrix(t *testing.T) {
	f := newFixture(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, h := range []string{"h1", "h2"} {
		cfg := jsetup.HostTaskConsumerConfig(f.names, h, 30*time.Second, 16)
		if _, err := f.admin.js.CreateOrUpdateConsumer(ctx, f.names.TasksStream(), cfg); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.admin.js.CreateOrUpdateConsumer(ctx, f.names.CommandsStream(), jetstream.ConsumerConfig{
		Durable: f.names.CommandConsumer(), AckPolicy: jetstream.AckExplicitPolicy}); err != nil {
		t.Fatal(err)
	}
	for _, st := range streamNames() {
		f.victim(st)
	}
	// Something to read in each stream.
	for _, subj := range sample {
		if _, err := f.admin.js.Publish(ctx, subj, []byte("{}")); err != nil {
			t.Fatalf("%s: %v", subj, err)
		}
	}

	// Every role has rows.
	for _, r := range auth.Roles {
		if !slices.ContainsFunc(identities, func(id auth.Identity) bool { return id.Role == r }) {
			t.Fatalf("role %s has no rows in the matrix: add an identity of it", r)
		}
	}
	clients := map[string]*client{}
	for _, id := range identities {
		clients[id.Name()] = f.connect(id)
	}

	cs := cells(f)
	checked, byRole := 0, map[string]int{}
	var wrong []string
	for _, c := range cs {
		for _, id := range identities {
			cl := clients[id.Name()]
			got := c.run(cl)
			want := slices.Contains(c.allow, id.Name())
			checked++
			byRole[id.Name()]++
			if got != want {
				verb := map[bool]string{true: "allowed", false: "refused"}
				wrong = append(wrong, fmt.Sprintf("%-10s %s (%s): %s, want %s", id.Name(), c.family, c.subject, verb[got], verb[want]))
			}
		}
	}
	// No credentials: no connection at all.
	if nc, err := nats.Connect(f.url); err == nil {
		nc.Close()
		wrong = append(wrong, "no credentials: connected")
	}
	checked++
	byRole["no credentials"]++

	// Every permission is exercised by a cell that expects it.
	for _, id := range identities {
		cl := clients[id.Name()]
		for _, list := range []struct {
			kind  string
			allow []string
		}{{"pub", cl.perms.Pub.Allow}, {"sub", cl.perms.Sub.Allow}} {
			for _, p := range list.allow {
				if !slices.ContainsFunc(cs, func(c cell) bool {
					kind := c.kind
					if kind == "rollup" {
						kind = "pub"
					}
					return kind == list.kind && c.subject != "" && server.SubjectMatchesFilter(c.subject, p) && slices.Contains(c.allow, id.Name())
				}) {
					wrong = append(wrong, fmt.Sprintf("%s may %s %q, which no cell expects: add a row to the matrix", id.Name(), list.kind, p))
				}
			}
		}
	}
	var roles []string
	for r, n := range byRole {
		roles = append(roles, fmt.Sprintf("%s %d", r, n))
	}
	sort.Strings(roles)
	t.Logf("permission matrix: %d cells checked (%d families × %d identities, and no credentials): %s", checked, len(cs), len(identities), strings.Join(roles, ", "))
	if len(wrong) > 0 {
		t.Errorf("%d cells differ from the expected permissions:\n%s", len(wrong), strings.Join(wrong, "\n"))
	}
	_ = api.DefaultNames
}

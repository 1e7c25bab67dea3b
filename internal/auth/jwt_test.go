package auth_test

// Unit tests of the user JWTs each role is issued, decoded with
// nats-io/jwt/v2, without a server: name, issuer, limits, expiry, inbox
// prefix, and the publish and subscribe lists themselves. The real-server
// matrix (matrix_test.go) proves the server enforces them; these pin what
// is signed, including what a server check cannot show (no response
// permission, no expiry, the subscription limit, the names under another
// installation prefix).

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/auth"
)

// matches reports whether NATS subject pattern p (with * and >) covers
// the literal subject s.
func matches(p, s string) bool {
	pt, st := strings.Split(p, "."), strings.Split(s, ".")
	for i, t := range pt {
		if t == ">" {
			return len(st) > i
		}
		if i >= len(st) || (t != "*" && t != st[i]) {
			return false
		}
	}
	return len(pt) == len(st)
}

// allowed applies a permission's allow and deny lists to a literal subject
// as the server does: allowed if an allow pattern covers it and no deny
// pattern does.
func allowed(p jwt.Permission, subject string) bool {
	ok := slices.ContainsFunc(p.Allow, func(a string) bool { return matches(a, subject) })
	return ok && !slices.ContainsFunc(p.Deny, func(d string) bool { return matches(d, subject) })
}

func TestUnitSubjectMatcher(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		p, s string
		want bool
	}{
		{">", "a", true}, {">", "a.b", true}, {"a.>", "a", false}, {"a.>", "a.b.c", true},
		{"a.*", "a.b", true}, {"a.*", "a.b.c", false}, {"a.*.c", "a.b.c", true}, {"a.b", "a.b", true}, {"a.b", "a.c", false},
	} {
		if got := matches(tc.p, tc.s); got != tc.want {
			t.Errorf("matches(%q, %q) = %v", tc.p, tc.s, got)
		}
	}
}

// decode returns the user claims of a credentials file.
func decode(t *testing.T, creds []byte) *jwt.UserClaims {
	t.Helper()
	tok, err := jwt.ParseDecoratedJWT(creds)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		t.Fatal(err)
	}
	return uc
}

// rule is one subject an identity may or may not publish ("pub") or
// subscribe to ("sub").
type rule struct {
	kind, subject string
	want          bool
}

func allow(kind string, subjects ...string) []rule {
	out := make([]rule, len(subjects))
	for i, s := range subjects {
		out[i] = rule{kind, s, true}
	}
	return out
}

func deny(kind string, subjects ...string) []rule {
	out := make([]rule, len(subjects))
	for i, s := range subjects {
		out[i] = rule{kind, s, false}
	}
	return out
}

// rules lists, per identity, subjects its JWT must allow and refuse, for an
// installation with prefix p (stream names upper-cased from it).
func rules(id auth.Identity, p string) []rule {
	P := strings.ToUpper(p)
	var rs []rule
	add := func(r ...[]rule) {
		for _, x := range r {
			rs = append(rs, x...)
		}
	}
	switch id.Role {
	case auth.RoleAdmin, auth.RoleEngine:
		add(allow("pub", p+".cmd.web1.start.alice", p+".evt.web1.started._engine", "$JS.API.STREAM.DELETE."+P+"_EVENTS", "$KV."+P+"_HOSTS.h1"),
			allow("sub", p+".task.h1.web1", "_INBOX_VMHERD.operator.alice.x", "$SRV.INFO"))
	case auth.RoleOperator:
		add(allow("pub",
			p+".cmd.web1.start.alice", p+".console.h1.web1.in", p+".console.h1.web1.attach", p+".tunnel.h1.web1.t1.open",
			p+".tunnel.h1.web1.t1.up", p+".image.h1.pull", p+".image.h1.rm", p+".log.h1.web1",
			"$KV."+P+"_SSH.web1.1.key", "$KV."+P+"_HOSTS.h1.cordon", p+".query.h1.state",
			"$JS.API.DIRECT.GET.KV_"+P+"_SSH", "$JS.API.DIRECT.GET."+P+"_EVENTS", "$JS.API.CONSUMER.CREATE."+P+"_EVENTS.c1",
			"$JS.API.STREAM.INFO."+P+"_TASKS", "$JS.API.INFO"),
			deny("pub",
				p+".cmd.web1.start.bob", p+".cmd.web1.start", p+".evt.web1.started._engine", p+".evt.web1.started.h1",
				"$KV."+P+"_HOSTS.h1", "$KV."+P+"_RECORDS.web1", "$KV."+P+"_IMAGES.h1.deb", p+".console.h1.web1.out",
				p+".tunnel.h1.web1.t1.down", "$JS.API.CONSUMER.CREATE."+P+"_TASKS.c1", "$JS.API.CONSUMER.DELETE."+P+"_EVENTS.c1",
				"$JS.API.STREAM.DELETE."+P+"_EVENTS", "$JS.API.STREAM.PURGE."+P+"_EVENTS", "$JS.API.DIRECT.GET."+P+"_TASKS",
				"$JS.API.CONSUMER.DURABLE.CREATE."+P+"_EVENTS.d1", "_INBOX_VMHERD.worker.h1.x"),
			allow("sub", "_INBOX_VMHERD.operator.alice.x", p+".console.h1.web1.out", p+".tunnel.h1.web1.t1.down"),
			deny("sub", "_INBOX_VMHERD.operator.bob.x", "_INBOX_VMHERD.worker.h1.x", "_INBOX.x", p+".task.h1.web1",
				p+".cmd.web1.start.alice", p+".console.h1.web1.in", p+".query.h1.state", "$SRV.INFO"))
	case auth.RoleViewer:
		add(allow("pub", p+".log.h1.web1", p+".query.h1.state", "$JS.API.DIRECT.GET."+P+"_EVENTS", "$JS.API.DIRECT.GET.KV_"+P+"_RECORDS",
			"$JS.API.CONSUMER.CREATE."+P+"_EVENTS.c1"),
			deny("pub", p+".cmd.web1.start.dash", p+".console.h1.web1.in", p+".console.h1.web1.attach", p+".tunnel.h1.web1.t1.open",
				p+".image.h1.pull", "$KV."+P+"_HOSTS.h1.cordon", "$KV."+P+"_SSH.web1.1.key", "$JS.API.DIRECT.GET.KV_"+P+"_SSH",
				"$JS.API.DIRECT.GET."+P+"_TASKS"),
			allow("sub", "_INBOX_VMHERD.viewer.dash.x"),
			deny("sub", p+".console.h1.web1.out", p+".tunnel.h1.web1.t1.down", "_INBOX_VMHERD.operator.alice.x"))
	case auth.RoleWorker:
		h, o := id.Host, "h9"
		add(allow("pub",
			p+".evt.web1.started."+h, "$KV."+P+"_HOSTS."+h, "$KV."+P+"_IMAGES."+h+".deb",
			"$JS.API.CONSUMER.MSG.NEXT."+P+"_TASKS.worker-"+h, "$JS.API.DIRECT.GET."+P+"_EVENTS",
			"$JS.API.DIRECT.GET.KV_"+P+"_RECORDS", p+".console."+h+".web1.out", p+".tunnel."+h+".web1.t1.down",
			"_INBOX_VMHERD.operator.alice.x", "_INBOX.x"),
			deny("pub",
				p+".evt.web1.started."+o, p+".evt.web1.accepted._engine", "$KV."+P+"_HOSTS."+o, "$KV."+P+"_HOSTS."+h+".cordon",
				"$KV."+P+"_IMAGES."+o+".deb", "$KV."+P+"_RECORDS.web1", p+".cmd.web1.start.worker-"+h,
				"$JS.API.CONSUMER.MSG.NEXT."+P+"_TASKS.worker-"+o, "$JS.API.CONSUMER.CREATE."+P+"_TASKS.x",
				"$JS.API.CONSUMER.CREATE."+P+"_EVENTS.c1", p+".console."+o+".web1.out", "_INBOX_VMHERD.join."+h+".x",
				"$JS.API.DIRECT.GET.KV_"+P+"_SSH", p+".query."+h+".state"),
			allow("sub", "_INBOX_VMHERD.worker."+h+".x", p+".query."+h+".state", p+".console."+h+".web1.in", p+".log."+h+".web1",
				p+".tunnel."+h+".web1.t1.open", p+".image."+h+".pull", "$SRV.INFO", "$SRV.INFO.vmherd-worker-"+h),
			deny("sub", "_INBOX_VMHERD.worker."+o+".x", p+".query."+o+".state", p+".console."+o+".web1.in", p+".task."+h+".web1",
				"$SRV.INFO.vmherd-worker-"+o, p+".image."+o+".pull", p+".evt.web1.started."+h))
	}
	return rs
}

// Every role's credentials: named for the identity, signed by the
// account, no expiry, the subscription limit of its kind, no response
// permission (a request's reply subject never widens what it may
// publish), the inbox prefix it must use, and the subjects it may and
// may not publish and subscribe to, under the default prefix and another.
func TestUnitRoleJWTs(t *testing.T) {
	t.Parallel()
	a, err := auth.Open(filepath.Join(t.TempDir(), "auth"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, prefix := range []string{api.DefaultPrefix, "lab"} {
		for _, id := range identities {
			id.Names = api.Names{Prefix: prefix}
			t.Run(prefix+"/"+id.Name(), func(t *testing.T) {
				creds, err := a.IdentityCreds(id)
				if err != nil {
					t.Fatal(err)
				}
				uc := decode(t, creds)
				vr := jwt.CreateValidationResults()
				uc.Validate(vr)
				if vr.IsBlocking(true) {
					t.Fatalf("invalid claims: %v", vr.Errors())
				}
				if uc.Name != id.Name() || uc.Issuer != a.AccountPub || uc.IssuerAccount != "" || !nkeys.IsValidPublicUserKey(uc.Subject) {
					t.Fatalf("name %q issuer %q issuer account %q subject %q", uc.Name, uc.Issuer, uc.IssuerAccount, uc.Subject)
				}
				if uc.Expires != 0 || uc.BearerToken {
					t.Fatalf("expires %d, bearer %v", uc.Expires, uc.BearerToken)
				}
				subs := int64(-1)
				if id.Role == auth.RoleOperator || id.Role == auth.RoleViewer {
					subs = auth.PersonSubs
				}
				if uc.Limits.Subs != subs || uc.Limits.Data != jwt.NoLimit || uc.Limits.Payload != jwt.NoLimit {
					t.Fatalf("limits: subs %d data %d payload %d, want subs %d and the account's data and payload", uc.Limits.Subs, uc.Limits.Data, uc.Limits.Payload, subs)
				}
				if uc.Resp != nil {
					t.Fatalf("response permission %+v", uc.Resp)
				}
				if len(uc.Sub.Deny) != 0 {
					t.Fatalf("subscribe deny list %v", uc.Sub.Deny)
				}
				wantDeny := []string(nil)
				if id.Role == auth.RoleWorker {
					wantDeny = []string{auth.InboxRoot + ".join.>"}
				}
				if !slices.Equal(uc.Pub.Deny, wantDeny) {
					t.Fatalf("publish deny list %v, want %v", uc.Pub.Deny, wantDeny)
				}
				for _, s := range append(slices.Clone(uc.Pub.Allow), uc.Sub.Allow...) {
					if prefix != api.DefaultPrefix && strings.HasPrefix(s, api.DefaultPrefix+".") {
						t.Errorf("%s under prefix %s", s, prefix)
					}
				}

				// The inbox prefix: the identity's own, in the JWT and
				// as clients read it from the file.
				wantInbox := auth.InboxRoot + "." + string(id.Role) + "." + map[bool]string{true: id.Host, false: id.Name()}[id.Role == auth.RoleWorker]
				if id.InboxPrefix() != wantInbox || !slices.Contains(uc.Sub.Allow, wantInbox+".>") {
					t.Fatalf("inbox prefix %s, want %s in %v", id.InboxPrefix(), wantInbox, uc.Sub.Allow)
				}
				path := filepath.Join(dir, prefix+"-"+id.Name()+".creds")
				if err := os.WriteFile(path, creds, 0o600); err != nil {
					t.Fatal(err)
				}
				if got, err := auth.CredsInboxPrefix(path); err != nil || got != wantInbox {
					t.Fatalf("CredsInboxPrefix %q, %v", got, err)
				}
				if got, err := auth.CredsName(path); err != nil || got != id.Name() {
					t.Fatalf("CredsName %q, %v", got, err)
				}

				perms, err := id.Permissions()
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(uc.Pub.Allow, perms.Pub.Allow) || !slices.Equal(uc.Sub.Allow, perms.Sub.Allow) {
					t.Fatal("the JWT's lists are not the role's permissions")
				}
				rs := rules(id, prefix)
				if len(rs) == 0 {
					t.Fatal("no rules for this role")
				}
				for _, r := range rs {
					p := uc.Pub
					if r.kind == "sub" {
						p = uc.Sub
					}
					if got := allowed(p, r.subject); got != r.want {
						t.Errorf("%s may %s %s: %v, want %v", id.Name(), r.kind, r.subject, got, r.want)
					}
				}
			})
		}
	}
}

// Expiring credentials carry the expiry asked for, and a JWT for a key
// the caller keeps is for that key; identities that name no valid host
// or user, or no role, get none.
func TestUnitExpiryAndRefusals(t *testing.T) {
	t.Parallel()
	a, err := auth.Open(filepath.Join(t.TempDir(), "auth"))
	if err != nil {
		t.Fatal(err)
	}
	until := time.Now().Add(90 * time.Minute).Truncate(time.Second)
	creds, err := a.IdentityCredsUntil(auth.Identity{Role: auth.RoleWorker, Host: "h3"}, until)
	if err != nil {
		t.Fatal(err)
	}
	if uc := decode(t, creds); uc.Expires != until.Unix() || uc.Name != "worker-h3" {
		t.Fatalf("expires %d (want %d), name %s", uc.Expires, until.Unix(), uc.Name)
	}

	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	tok, err := a.UserJWT(auth.Identity{Role: auth.RoleOperator, User: "carol"}, pub, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	uc, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		t.Fatal(err)
	}
	if uc.Subject != pub || uc.Expires != 0 || uc.Name != "carol" || uc.Limits.Subs != auth.PersonSubs {
		t.Fatalf("subject %s (want %s) expires %d name %s subs %d", uc.Subject, pub, uc.Expires, uc.Name, uc.Limits.Subs)
	}
	accountKey, _ := nkeys.CreateAccount()
	apub, _ := accountKey.PublicKey()
	if _, err := a.UserJWT(auth.Identity{Role: auth.RoleOperator, User: "carol"}, apub, time.Time{}); err == nil {
		t.Fatal("a user JWT for an account key")
	}

	issued, err := a.IssuedTo("carol")
	if err != nil || !slices.ContainsFunc(issued, func(i auth.Issued) bool { return i.Pub == pub }) {
		t.Fatalf("carol's key is not recorded for revocation: %+v, %v", issued, err)
	}

	for _, id := range []auth.Identity{
		{Role: auth.RoleWorker, Host: "no.dots"},
		{Role: auth.RoleWorker},
		{Role: auth.RoleOperator, User: "with space"},
		{Role: auth.RoleViewer, User: "a.b"},
		{Role: "root"},
	} {
		if _, err := a.IdentityCreds(id); err == nil {
			t.Errorf("credentials for %+v", id)
		}
	}
}

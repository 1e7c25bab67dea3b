package auth_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/vmherd/vmherd/internal/join"
)

// The two identities joining adds, against a real server: a join token's
// bootstrap credentials may ask to join as their own host and hear the
// answer, and nothing else; the join service's may take requests and
// answer joining hosts, and nothing else.
func TestJoinIdentities(t *testing.T) {
	f := newFixture(t, false)
	connect := func(name string, b []byte, inbox string) *client {
		t.Helper()
		path := filepath.Join(f.dir, name+".creds")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		opts := []nats.Option{nats.UserCredentials(path), nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {})}
		if inbox != "" {
			opts = append(opts, nats.CustomInboxPrefix(inbox))
		}
		nc, err := nats.Connect(f.url, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return &client{nc: nc}
	}
	boot, _, err := f.a.LimitedCreds("join-h3", join.BootstrapPermissions("h3"), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	svc, _, err := f.a.LimitedCreds("join-service", join.ServicePermissions(), time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	b := connect("join-h3", boot, join.InboxPrefix("h3"))
	s := connect("join-service", svc, "")
	pub := func(c *client, subj string) bool { return c.pub(&nats.Msg{Subject: subj, Data: []byte("{}")}) }
	for _, tc := range []struct {
		who  string
		c    *client
		kind string
		subj string
		want bool
	}{
		{"bootstrap h3", b, "pub", "vmherd.join.h3", true},
		{"bootstrap h3", b, "sub", "_INBOX_VMHERD.join.h3.>", true},
		{"bootstrap h3", b, "pub", "vmherd.join.h4", false},
		{"bootstrap h3", b, "sub", "_INBOX_VMHERD.join.h4.>", false},
		{"bootstrap h3", b, "sub", "vmherd.join.*", false},
		{"bootstrap h3", b, "pub", "_INBOX_VMHERD.join.h4.x", false},
		{"bootstrap h3", b, "pub", "vm.cmd.web1.start", false},
		{"bootstrap h3", b, "pub", "vm.evt.web1.started.h3", false},
		{"bootstrap h3", b, "pub", "$KV.VM_HOSTS.h3", false},
		{"bootstrap h3", b, "pub", "$JS.API.INFO", false},
		{"bootstrap h3", b, "sub", "vm.>", false},
		{"bootstrap h3", b, "sub", "_INBOX_VMHERD.>", false},
		{"join service", s, "sub", "vmherd.join.*", true},
		{"join service", s, "pub", "_INBOX_VMHERD.join.h3.x", true},
		{"join service", s, "pub", "_INBOX_VMHERD.operator.alice.x", false},
		{"join service", s, "sub", "_INBOX_VMHERD.join.h3.>", false},
		{"join service", s, "pub", "vmherd.join.h3", false},
		{"join service", s, "pub", "vm.cmd.web1.start", false},
		{"join service", s, "pub", "$JS.API.INFO", false},
		{"join service", s, "pub", "$KV.VM_HOSTS.h3", false},
		{"join service", s, "sub", "vm.>", false},
	} {
		var got bool
		if tc.kind == "pub" {
			got = pub(tc.c, tc.subj)
		} else {
			got = tc.c.sub(tc.subj)
		}
		if got != tc.want {
			t.Errorf("%s may %s %s: %v, want %v", tc.who, tc.kind, tc.subj, got, tc.want)
		}
	}
}

package hosts_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/testenv"
)

// A cordon key whose host part is no host id (an operator may put any
// <x>.cordon key) is refused: it makes no host and no host event
// (issue #22, item 8).
func TestCordonOnlyForHostIDs(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	kv, err := env.JS.KeyValue(ctx, env.Names.HostsBucket())
	if err != nil {
		t.Fatal(err)
	}
	reg := hosts.NewRegistry(time.Minute)
	go func() { _ = reg.Run(ctx, kv) }()
	select {
	case <-reg.Ready():
	case <-ctx.Done():
		t.Fatal("registry not ready")
	}
	body := []byte(`{"time":"2025-01-01T00:00:00Z","reason":"x"}`)
	for _, k := range []string{"_engine", strings.Repeat("a", 3000), "Bad-Case", "h1"} {
		if _, err := kv.Put(ctx, api.CordonKey(k), body); err != nil {
			t.Fatalf("put %.20s…: %v", k, err)
		}
	}
	var got []string
	for len(got) == 0 || got[len(got)-1] != "h1" {
		select {
		case c := <-reg.Changes():
			got = append(got, c.Host)
		case <-ctx.Done():
			t.Fatalf("host changes: %.40q", got)
		}
	}
	if len(got) != 1 {
		t.Fatalf("host changes for %d hosts, want h1 only: %.80q", len(got), got)
	}
}

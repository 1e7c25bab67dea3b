package engine

import (
	"fmt"
	"testing"
	"time"
)

func TestIssuerLimits(t *testing.T) {
	l := newIssuerLimits(RateLimit{PerSecond: 10, Burst: 3})
	now := time.Unix(1000, 0)
	for i := range 3 {
		if !l.allow("alice", now) {
			t.Fatalf("alice's command %d within the burst was refused", i)
		}
	}
	if l.allow("alice", now) {
		t.Fatal("alice's 4th command at once passed a burst of 3")
	}
	if !l.allow("bob", now) {
		t.Fatal("bob is limited by alice's commands")
	}
	if !l.allow("", now) {
		t.Fatal("a command without an issuer was limited")
	}
	if !l.allow("alice", now.Add(100*time.Millisecond)) {
		t.Fatal("alice got no token back after 100 ms at 10/s")
	}
	// With too many buckets, the idle (full again) ones go.
	for i := range maxIssuers {
		l.allow(fmt.Sprintf("u%d", i), now)
	}
	l.allow("late", now.Add(time.Second))
	if len(l.m) != 1 {
		t.Fatalf("%d buckets kept after every other was idle for a second", len(l.m))
	}
	if off := newIssuerLimits(RateLimit{}); !off.allow("x", now) || !off.allow("x", now) {
		t.Fatal("a zero rate limited")
	}
}

package main

import (
	"os/exec"
	"strings"
	"testing"
)

// vmctl is a client: it must not link the NATS server, the OCI registry
// client (the workers pull images, not vmctl) or the testing package.
// go list -deps is what the linker gets.
func TestVmctlDeps(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	deps := strings.Fields(string(out))
	for _, d := range deps {
		switch {
		case strings.HasPrefix(d, "github.com/nats-io/nats-server"),
			strings.HasPrefix(d, "github.com/google/go-containerregistry"),
			d == "testing",
			strings.Contains(d, "/internal/testenv"):
			t.Errorf("vmctl links %s", d)
		}
	}
	t.Logf("vmctl links %d packages", len(deps))
}

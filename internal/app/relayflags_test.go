package app

import (
	"testing"

	"github.com/spf13/pflag"

	"github.com/vmherd/vmherd/internal/relay"
)

// The worker's --tunnels and --tunnels-per-identity bound the tunnels to
// its guests; the defaults are the relay's.
func TestTunnelLimitFlags(t *testing.T) {
	t.Parallel()
	parse := func(args ...string) WorkerOptions {
		var o WorkerOptions
		fs := pflag.NewFlagSet("worker", pflag.ContinueOnError)
		o.AddFlags(fs, true)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		return o
	}
	if o := parse(); o.Tunnels != relay.DefaultTunnels || o.TunnelsPerIdentity != relay.DefaultTunnelsPerRequester {
		t.Fatalf("defaults: --tunnels %d, --tunnels-per-identity %d", o.Tunnels, o.TunnelsPerIdentity)
	}
	if o := parse("--tunnels", "1000", "--tunnels-per-identity", "100"); o.Tunnels != 1000 || o.TunnelsPerIdentity != 100 {
		t.Fatalf("set: --tunnels %d, --tunnels-per-identity %d", o.Tunnels, o.TunnelsPerIdentity)
	}
}

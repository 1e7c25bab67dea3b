package app

import (
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/vmherd/vmherd/internal/images"
)

// The worker's --image-* flags make the image store's pull policy; the
// defaults refuse private destinations and plain-HTTP registries.
func TestImagePolicyFlags(t *testing.T) {
	t.Parallel()
	parse := func(args ...string) (images.Policy, error) {
		var o WorkerOptions
		fs := pflag.NewFlagSet("worker", pflag.ContinueOnError)
		o.AddFlags(fs, true)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		return o.imagePolicy()
	}
	p, err := parse()
	if err != nil || p.AllowPrivate || p.AllowHTTPRegistry || p.MaxSize != images.DefaultMaxSize || p.Timeout != images.DefaultPullTimeout {
		t.Fatalf("defaults: %+v %v", p, err)
	}
	p, err = parse("--image-allow-private", "--image-allow-http-registry", "--image-max-size", "512MiB", "--image-pull-timeout", "5m")
	if err != nil || !p.AllowPrivate || !p.AllowHTTPRegistry || p.MaxSize != 512<<20 || p.Timeout != 5*time.Minute {
		t.Fatalf("set: %+v %v", p, err)
	}
	for in, want := range map[string]int64{"20GiB": 20 << 30, "20G": 20 << 30, "1 TiB": 1 << 40, "4096": 4096, "64k": 64 << 10} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0", "-1G", "12PB", "G", "9999999999T"} {
		if _, err := parseSize(bad); err == nil || !strings.Contains(err.Error(), "not a size") {
			t.Errorf("parseSize(%q): %v", bad, err)
		}
	}
}

package config_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/vmherd/vmherd/internal/config"
)

type opts struct {
	dir     string
	n       int
	rate    float64
	on      bool
	wait    time.Duration
	dirs    []string
	servers []string
	conf    string
}

func flags(o *opts) *pflag.FlagSet {
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	fs.StringVar(&o.conf, "config", "", "config file")
	fs.StringVar(&o.dir, "data-dir", "/var/lib/x", "data directory")
	fs.IntVar(&o.n, "concurrency", 64, "calls at once")
	fs.Float64Var(&o.rate, "command-rate", 50, "rate")
	fs.BoolVar(&o.on, "with-worker", false, "local worker")
	fs.DurationVar(&o.wait, "heartbeat", 2*time.Second, "heartbeat")
	fs.StringArrayVar(&o.dirs, "image-dir", nil, "image dirs")
	fs.StringSliceVar(&o.servers, "propolis-server", []string{"a"}, "servers")
	return fs
}

func TestApplySetsEveryKind(t *testing.T) {
	var o opts
	fs := flags(&o)
	err := config.Apply(fs, "x.toml", `
data-dir = "/srv/vmherd"
concurrency = 8
command-rate = 2.5
with-worker = true
heartbeat = "1s"
image-dir = ["/a", "/b"]
propolis-server = []
`)
	if err != nil {
		t.Fatal(err)
	}
	if o.dir != "/srv/vmherd" || o.n != 8 || o.rate != 2.5 || !o.on || o.wait != time.Second ||
		strings.Join(o.dirs, ",") != "/a,/b" || len(o.servers) != 0 {
		t.Fatalf("got %+v", o)
	}
}

func TestCommandLineWins(t *testing.T) {
	var o opts
	fs := flags(&o)
	if err := fs.Parse([]string{"--concurrency", "3"}); err != nil {
		t.Fatal(err)
	}
	if err := config.Apply(fs, "x.toml", "concurrency = 8\ndata-dir = \"/d\""); err != nil {
		t.Fatal(err)
	}
	if o.n != 3 || o.dir != "/d" {
		t.Fatalf("got %+v", o)
	}
}

func TestErrorsNameTheKey(t *testing.T) {
	for _, tc := range []struct{ text, want string }{
		{`data-dri = "/x"`, `unknown key "data-dri" (did you mean "data-dir"?`},
		{`concurrency = "8"`, `key "concurrency": the string "8", but it takes a whole number`},
		{`heartbeat = 5`, `key "heartbeat": the number 5, but it takes a duration string`},
		{`heartbeat = "soon"`, `key "heartbeat": invalid argument "soon"`},
		{`data-dir = ["/a"]`, `key "data-dir": a list, but it takes one string value`},
		{`config = "/etc/other.toml"`, `unknown key "config"`},
		{`[engine]` + "\nx = 1", `unknown key "engine"`},
		{`data-dir = `, `x.toml: toml:`},
	} {
		var o opts
		err := config.Apply(flags(&o), "x.toml", tc.text)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, config.ErrInvalid) {
			t.Errorf("%q: got %v, want it to contain %q", tc.text, err, tc.want)
		}
	}
}

// TestPrintLoadsBack: what Print writes is a file Load accepts, with
// every key.
func TestPrintLoadsBack(t *testing.T) {
	var o opts
	fs := flags(&o)
	var b strings.Builder
	if err := config.Print(&b, fs); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"data-dir = \"/var/lib/x\"", "concurrency = 64", "heartbeat = \"2s\"", "image-dir = []", "propolis-server = [\"a\"]", "with-worker = false", "command-rate = 50"} {
		if !strings.Contains(b.String(), k+"\n") {
			t.Errorf("printed config lacks %q:\n%s", k, b.String())
		}
	}
	if strings.Contains(b.String(), "config =") {
		t.Error("printed the --config flag as a key")
	}
	var o2 opts
	if err := config.Apply(flags(&o2), "printed", b.String()); err != nil {
		t.Fatalf("%v\n%s", err, b.String())
	}
}

package app

import (
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/vmherd/vmherd/internal/config"
	"github.com/vmherd/vmherd/internal/engine"
)

// The engine's --retain-destroyed: 7 days by default, set on the command
// line or by its key in the configuration file, 0 allowed (keep for ever).
func TestRetainDestroyedFlag(t *testing.T) {
	t.Parallel()
	parse := func(file string, args ...string) EngineOptions {
		t.Helper()
		var o EngineOptions
		fs := pflag.NewFlagSet("engine", pflag.ContinueOnError)
		o.AddFlags(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		if file != "" {
			if err := config.Apply(fs, "engine.toml", file); err != nil {
				t.Fatal(err)
			}
		}
		return o
	}
	if o := parse(""); o.RetainDestroyed != engine.DefaultRetainDestroyed || engine.DefaultRetainDestroyed != 7*24*time.Hour {
		t.Fatalf("default --retain-destroyed %s", o.RetainDestroyed)
	}
	if o := parse("", "--retain-destroyed", "36h"); o.RetainDestroyed != 36*time.Hour {
		t.Fatalf("--retain-destroyed 36h: %s", o.RetainDestroyed)
	}
	if o := parse(`retain-destroyed = "1h30m"`); o.RetainDestroyed != 90*time.Minute {
		t.Fatalf("retain-destroyed in the file: %s", o.RetainDestroyed)
	}
	if o := parse(`retain-destroyed = "0s"`); o.RetainDestroyed != 0 {
		t.Fatalf("retain-destroyed 0 in the file: %s", o.RetainDestroyed)
	}
	// The command line wins over the file.
	if o := parse(`retain-destroyed = "1h"`, "--retain-destroyed", "2h"); o.RetainDestroyed != 2*time.Hour {
		t.Fatalf("flag and file: %s", o.RetainDestroyed)
	}
}

package app

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/vmherd/vmherd/internal/config"
	"github.com/vmherd/vmherd/internal/preflight"
)

// addConfigFlag registers --config (also VMHERD_CONFIG).
func addConfigFlag(fs *pflag.FlagSet, path *string, daemon string) {
	fs.StringVar(path, "config", "", fmt.Sprintf("read settings from this TOML file: one key per flag (`%s config --print` lists them); flags and VMHERD_* override it", daemon))
}

// configure sets the daemon's flags from the environment, then from the
// configuration file (the one --config or VMHERD_CONFIG names, if any).
func configure(fs *pflag.FlagSet, path *string) error {
	if err := BindEnv(fs); err != nil {
		return err
	}
	if *path == "" {
		return nil
	}
	if err := checkRootFile(*path); err != nil {
		return fmt.Errorf("%w: %w", config.ErrInvalid, err)
	}
	return config.Load(fs, *path)
}

// checkRootFile refuses, to a daemon running as root, a file that someone
// else could have changed: the configuration says what it runs, the
// credentials who it is.
func checkRootFile(path string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	if c := preflight.FileCheck(path, false); c.Status == preflight.Fail {
		return errors.New(c.Detail)
	}
	return nil
}

// configCmd is `engine config` / `worker config`: print every key of the
// daemon's configuration file with its default, or with the values a
// --config file and the environment give.
func configCmd(daemon string, newFlags func() *pflag.FlagSet) *cobra.Command {
	var print bool
	var path string
	c := &cobra.Command{
		Use:   "config",
		Short: "print the " + daemon + "'s configuration file keys with their defaults",
		Long: fmt.Sprintf(`config --print writes every key the %[1]s's configuration file accepts,
each with its help as a comment and its default value: a valid file to
start from. With --config FILE it prints the values FILE and the
environment give instead, after checking them as the %[1]s does at start.`, daemon),
		SilenceUsage: true,
		Args:         cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !print {
				return fmt.Errorf("say what to do: --print")
			}
			fs := newFlags()
			if path != "" {
				if err := configure(fs, &path); err != nil {
					return err
				}
			}
			return config.Print(cmd.OutOrStdout(), fs)
		},
	}
	c.Flags().BoolVar(&print, "print", false, "print every key with its default (or, with --config, its value)")
	c.Flags().StringVar(&path, "config", "", "a configuration file to check and print the values of")
	return c
}

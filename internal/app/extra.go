package app

import "github.com/spf13/cobra"

// engineExtraCommands and workerExtraCommands are the deployment
// commands (init, token, revoke; join, preflight).
func engineExtraCommands() []*cobra.Command { return nil }
func workerExtraCommands() []*cobra.Command { return nil }

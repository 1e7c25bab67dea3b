// Command vmctl is vmherd's command-line client.
package main

import (
	"os"

	"github.com/vmherd/vmherd/internal/vmctl"
)

func main() { os.Exit(vmctl.Main(os.Args[1:], os.Stdout, os.Stderr)) }

// Command worker runs one host's backend calls for vmherd.
package main

import (
	"os"

	"github.com/vmherd/vmherd/internal/app"
)

func main() { os.Exit(app.WorkerMain(os.Args[1:])) }

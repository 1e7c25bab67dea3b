// Command engine runs vmherd's engine: by default with an embedded NATS
// server on disk, optionally with a local worker (--with-worker).
package main

import (
	"os"

	"github.com/vmherd/vmherd/internal/app"
)

func main() { os.Exit(app.EngineMain(os.Args[1:])) }

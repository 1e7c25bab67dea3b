// Command bench measures vmherd's lifecycle path against JetStream and
// QEMU baselines taken in the same run; see BENCHMARKS.md.
package main

import (
	"os"

	"github.com/vmherd/vmherd/internal/bench"
)

func main() { os.Exit(bench.Main(os.Args[1:])) }

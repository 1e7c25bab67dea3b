// Command vmherd-guest builds the test guest image and prints its path:
//
//	go run ./internal/guestimage/cmd/vmherd-guest [-cache DIR]
//
// Boot it by hand with
//
//	qemu-system-x86_64 -M q35 -accel tcg -cpu max -m 128 -nographic \
//	  -drive file=$(go run ./internal/guestimage/cmd/vmherd-guest),if=virtio,snapshot=on
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/vmherd/vmherd/internal/guestimage"
)

func main() {
	def, err := guestimage.DefaultCacheDir()
	if err != nil {
		def = ".cache/guest"
	}
	cache := flag.String("cache", def, "cache directory")
	flag.Parse()
	p, err := guestimage.Build(context.Background(), *cache)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(p)
}

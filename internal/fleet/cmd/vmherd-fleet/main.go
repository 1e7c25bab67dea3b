// Command vmherd-fleet brings vmherd's fleet topology up on this machine
// (as root) and keeps it until interrupted, then takes it down:
//
//	vmherd-fleet up --bin bin --nats-server $(go env GOPATH)/bin/nats-server
//	vmherd-fleet down   # remove what a killed run left behind
//
// scripts/fleet builds the binaries and runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vmherd/vmherd/internal/fleet"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: vmherd-fleet up|down [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dir := fs.String("dir", "/tmp/vmherd-fleet", "directory for the fleet's stores, data dirs and logs")
	bin := fs.String("bin", "bin", "directory with the engine, worker and vmctl binaries")
	natsServer := fs.String("nats-server", "nats-server", "the nats-server binary")
	hosts := fs.String("hosts", "h1=noop,h2=noop+qemu,h3=noop", "hosts and their backends (+ separated)")
	tag := fs.String("tag", "fl", "tag naming the network namespaces and links (vmh<tag>...)")
	engines := fs.Int("engines", 2, "number of engines")
	imageDir := fs.String("image-dir", ".cache/guest", "every worker's image root (the test guest's cache)")
	_ = fs.Parse(os.Args[2:])
	switch os.Args[1] {
	case "down":
		fleet.KillLeftovers(*dir)
		fleet.Sweep(*tag)
		fmt.Printf("stopped what fleet %q left running and removed its namespaces and links (files stay in %s)\n", *tag, *dir)
		return
	case "up":
	default:
		fmt.Fprintf(os.Stderr, "vmherd-fleet: unknown command %q (up or down)\n", os.Args[1])
		os.Exit(2)
	}
	var hc []fleet.HostConfig
	for _, h := range strings.Split(*hosts, ",") {
		name, backends, _ := strings.Cut(h, "=")
		root, _ := filepath.Abs(*imageDir)
		hc = append(hc, fleet.HostConfig{Name: name, Backends: strings.ReplaceAll(backends, "+", ","),
			WorkerArgs: []string{"--image-dir", root}})
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fleet.KillLeftovers(*dir)
	fleet.Sweep(*tag)
	_ = os.RemoveAll(*dir)
	f, err := fleet.Up(ctx, fleet.Config{Dir: *dir, Bin: *bin, NatsServer: *natsServer, Hosts: hc, Tag: *tag, Engines: *engines,
		Log: func(format string, args ...any) { fmt.Printf(format+"\n", args...) }})
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmherd-fleet:", err)
		os.Exit(1)
	}
	defer f.Down()
	fmt.Printf(`
The fleet is up, with authentication and TLS on. In another terminal:
  export NATS_URL=%s NATS_CREDS=%s NATS_CA=%s
  %s/vmctl list
  sudo -E ip netns exec %s %s/vmctl create web1 --backend noop --start   # from host h1's network
  nats --tlsca "$NATS_CA" stream ls                                   # the nats CLI reads NATS_URL and NATS_CREDS
Logs are in %s. Ctrl-C takes the fleet down.
`, f.URLs, f.AdminCreds(), f.TLS.CA, *bin, f.Hosts[hc[0].Name].NetNS, *bin, *dir)
	<-ctx.Done()
	fmt.Println("taking the fleet down")
}

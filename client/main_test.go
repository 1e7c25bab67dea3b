package client_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/app"
	"github.com/vmherd/vmherd/internal/auth"
	"github.com/vmherd/vmherd/internal/datadir"
	"github.com/vmherd/vmherd/internal/engine"
	"github.com/vmherd/vmherd/internal/worker"
)

// The tests and examples run against one engine in this process: its
// embedded NATS server on a free port, authentication on, and a local
// worker (host "local") with the Noop backend. NATS_URL and NATS_CREDS
// point at it with an operator's credentials (operator "ci"), so the
// examples connect as a program on the engine's machine would, with
// client.OptionsFromEnv.
var (
	engineURL  string
	adminCreds string
	opCreds    string
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "vmherd-client-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	addr := ln.Addr().String()
	ln.Close()

	var o app.EngineOptions
	fs := pflag.NewFlagSet("engine", pflag.ContinueOnError)
	o.AddFlags(fs)
	if err := fs.Parse([]string{"--data-dir", dir, "--listen", addr, "--with-worker", "--host", "local",
		"--backends", "noop", "--default-backend", "noop", "--noop-latency", "10ms", "--log-level", "error"}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ready := make(chan string, 1)
	o.Ready = func(url string, _ *engine.Engine, _ *worker.Worker) { ready <- url }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- app.RunEngine(ctx, o) }()
	select {
	case engineURL = <-ready:
	case err := <-done:
		fmt.Fprintln(os.Stderr, "engine:", err)
		cancel()
		return 1
	case <-time.After(60 * time.Second):
		fmt.Fprintln(os.Stderr, "engine did not start in 60 s")
		cancel()
		return 1
	}
	adminCreds = datadir.AdminCreds(dir)
	a, err := auth.Open(datadir.AuthDir(dir))
	if err == nil {
		opCreds = filepath.Join(dir, "ci.creds")
		err = a.WriteCreds(opCreds, auth.Identity{Role: auth.RoleOperator, User: "ci", Names: api.DefaultNames})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "operator credentials:", err)
		cancel()
		return 1
	}
	os.Setenv("NATS_URL", engineURL)
	os.Setenv("NATS_CREDS", opCreds)
	code := m.Run()
	cancel()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		fmt.Fprintln(os.Stderr, "engine did not stop in 60 s")
		code = 1
	}
	return code
}

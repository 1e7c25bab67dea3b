package app

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/pflag"
)

// DefaultDrainTimeout bounds a graceful stop: long enough for a backend
// call with the default stop timeout (30 s) and its result write.
const DefaultDrainTimeout = 90 * time.Second

// addDrainFlag registers --drain-timeout.
func addDrainFlag(fs *pflag.FlagSet, d *time.Duration) {
	fs.DurationVar(d, "drain-timeout", DefaultDrainTimeout, "on SIGINT/SIGTERM, how long to let backend calls in progress finish and record their results before exiting anyway (a second signal exits at once)")
}

// exit is os.Exit; tests replace it.
var exit = os.Exit

// runUntilSignalled runs run under a context that the first SIGINT or
// SIGTERM cancels: run then drains (finishes the calls in progress and
// records their results). A second signal, or the drain outliving drain,
// ends the process at once with exit code 1; whatever was left unacked is
// redelivered to the next process, and every step is idempotent.
func runUntilSignalled(log *slog.Logger, drain time.Duration, run func(ctx context.Context) error) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	select {
	case err := <-done:
		return err
	case sig := <-sigs:
		log.Info("stopping: draining calls in progress; a second signal exits at once", "signal", sig.String(), "drain_timeout", drain)
		cancel()
	}
	t := time.NewTimer(drain)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case sig := <-sigs:
		log.Warn("second signal: exiting without finishing the drain; unfinished tasks are redelivered", "signal", sig.String())
	case <-t.C:
		log.Warn("drain deadline passed: exiting with calls in progress; unfinished tasks are redelivered", "drain_timeout", drain)
	}
	fmt.Fprintln(os.Stderr, "stopped before the drain finished")
	exit(1)
	return nil
}

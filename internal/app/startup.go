package app

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"
)

// waitStreams is the worker's start-up check: the streams and buckets the
// engine owns exist and have what the worker relies on.
func waitStreams(ctx context.Context, js jetstream.JetStream, n api.Names, log *slog.Logger) error {
	return jsetup.RetryStartup(ctx, log, "the engine's streams and buckets", func(ctx context.Context) error {
		if err := jsetup.Check(ctx, js, n); err != nil {
			return fmt.Errorf("checking streams and buckets: %w", err)
		}
		return nil
	})
}

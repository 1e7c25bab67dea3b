package jsetup

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/vmherd/vmherd/api"
)

// Ensure creates or updates every stream and bucket. Only the engine (and
// `engine rebuild`) call it: stream and bucket settings have one owner, so a
// worker or client started with other defaults can never scale an R3
// stream down or change its limits. Everyone else calls Check.
//
// It is safe to call from every
// process at start-up.
func Ensure(ctx context.Context, js jetstream.JetStream, n api.Names, s Settings) error {
	for _, cfg := range StreamConfigs(n, s) {
		if _, err := js.CreateOrUpdateStream(ctx, cfg); err != nil {
			return fmt.Errorf("creating stream %s: %w", cfg.Name, err)
		}
	}
	for _, cfg := range BucketConfigs(n, s) {
		if err := EnsureBucket(ctx, js, cfg); err != nil {
			return err
		}
	}
	// Earlier versions queued tasks through a durable consumer of the
	// accepted events; the deciding engine does that now.
	if err := js.DeleteConsumer(ctx, n.EventsStream(), "dispatch"); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return fmt.Errorf("removing the old dispatch consumer: %w", err)
	}
	return nil
}

// EnsureBucket creates a bucket, or updates an existing one to cfg, and
// makes its stream refuse rollups (the Nats-Rollup header): NATS checks
// who may publish on a key's subject, not the headers, and a rollup put on
// one's own key ("Nats-Rollup: all") would purge every other key of the
// bucket (every heartbeat and cordon, every image status). vmherd never
// purges a key (kv.Purge is a rollup); an admin who must can purge the
// stream by subject ($JS.API.STREAM.PURGE). A new bucket is created
// allowing rollups, as jetstream creates every bucket, and changed at once;
// an existing one is updated in place from its own stream configuration,
// so it never allows them again: only the settings in cfg that vmherd
// sets (description, history, replicas) are carried over.
func EnsureBucket(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) error {
	st, err := js.Stream(ctx, "KV_"+cfg.Bucket)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		if _, err := js.CreateKeyValue(ctx, cfg); err != nil && !errors.Is(err, jetstream.ErrBucketExists) {
			return fmt.Errorf("creating bucket %s: %w", cfg.Bucket, err)
		}
		if st, err = js.Stream(ctx, "KV_"+cfg.Bucket); err != nil {
			return fmt.Errorf("creating bucket %s: %w", cfg.Bucket, err)
		}
	} else if err != nil {
		return fmt.Errorf("looking up bucket %s: %w", cfg.Bucket, err)
	}
	sc := st.CachedInfo().Config
	want := sc
	want.Description = cfg.Description
	if cfg.History > 0 {
		want.MaxMsgsPerSubject = int64(cfg.History)
	}
	if cfg.Replicas > 0 {
		want.Replicas = cfg.Replicas
	}
	want.AllowRollup = false
	if reflect.DeepEqual(want, sc) {
		return nil
	}
	if _, err := js.UpdateStream(ctx, want); err != nil {
		return fmt.Errorf("updating bucket %s: %w", cfg.Bucket, err)
	}
	return nil
}

// NotReadyError says what is missing or set differently from what a
// non-owner (worker, client) relies on.
type NotReadyError struct {
	Problems []string
}

func (e *NotReadyError) Error() string {
	return strings.Join(e.Problems, "; ")
}

// Check verifies, without changing anything, that every stream and bucket
// exists and has the settings the worker and clients rely on: the tasks
// stream is a work queue (one delivery per task), and the events stream
// keeps a duplicate window (result writes are deduplicated by message id).
// Replicas and limits are the engine's business and are only reported by
// the engine. A *NotReadyError lists each problem; other errors are the
// server's (unreachable, no JetStream, no leader yet).
func Check(ctx context.Context, js jetstream.JetStream, n api.Names) error {
	var problems []string
	for _, want := range StreamConfigs(n, DefaultSettings) {
		st, err := js.Stream(ctx, want.Name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			problems = append(problems, fmt.Sprintf("stream %s does not exist (the engine creates it: start an engine with --prefix %s)", want.Name, n.Prefix))
			continue
		}
		if err != nil {
			return fmt.Errorf("looking up stream %s: %w", want.Name, err)
		}
		got := st.CachedInfo().Config
		if got.Retention != want.Retention {
			problems = append(problems, fmt.Sprintf("stream %s has retention %s, vmherd needs %s", want.Name, got.Retention, want.Retention))
		}
		if want.Name != n.CommandsStream() && got.Duplicates <= 0 {
			problems = append(problems, fmt.Sprintf("stream %s has no duplicate window, vmherd needs one", want.Name))
		}
	}
	for _, want := range BucketConfigs(n, DefaultSettings) {
		if _, err := js.KeyValue(ctx, want.Bucket); err != nil {
			if errors.Is(err, jetstream.ErrBucketNotFound) {
				problems = append(problems, fmt.Sprintf("bucket %s does not exist (the engine creates it)", want.Bucket))
				continue
			}
			return fmt.Errorf("looking up bucket %s: %w", want.Bucket, err)
		}
	}
	if len(problems) > 0 {
		return &NotReadyError{Problems: problems}
	}
	return nil
}

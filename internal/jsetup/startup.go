package jsetup

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Transient reports a start-up error that goes away by itself: a cluster
// still electing its meta or stream leaders answers 503, insufficient
// resources (10023), no suitable peers (10005) or not at all, and a worker may start before the
// engine has created the streams.
func Transient(err error) bool {
	var nr *NotReadyError
	var apiErr *jetstream.APIError
	switch {
	case errors.As(err, &nr):
		return true
	case errors.As(err, &apiErr):
		// 10023 insufficient resources and 10005 no suitable peers for
		// placement: the cluster does not know all its peers yet (or has
		// fewer than --replicas: then the log says so until it does).
		return apiErr.Code == 503 || apiErr.Code == 408 || apiErr.ErrorCode == ErrCodeInsufficientResources || apiErr.ErrorCode == ErrCodeNoSuitablePeers ||
			apiErr.ErrorCode == jetstream.JSErrCodeJetStreamNotEnabled
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse) ||
		errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrDisconnected) ||
		errors.Is(err, jetstream.ErrJetStreamNotEnabled)
}

// JetStream API error codes the start-up waits out (the server's
// JSInsufficientResourcesErr and JSClusterNoPeersErrF).
const (
	ErrCodeInsufficientResources jetstream.ErrorCode = 10023
	ErrCodeNoSuitablePeers       jetstream.ErrorCode = 10005
)

// startupBackoff bounds the wait between start-up attempts, and each
// attempt's own time: it starts short and doubles, because a request sent
// to a cluster still forming can go unanswered (seen on a fresh 3-node
// cluster: the first stream creation of two engines starting together got
// no reply at all), and grows so that a slow server still gets the time it
// needs.
var startupBackoff = struct{ first, max, firstAttempt, maxAttempt time.Duration }{
	250 * time.Millisecond, 5 * time.Second, 2 * time.Second, 20 * time.Second}

// RetryStartup runs step until it succeeds, ctx ends, or it fails for a
// reason that will not go away. Each transient failure is logged with what
// is being waited for, and retried with a doubling backoff.
func RetryStartup(ctx context.Context, log *slog.Logger, what string, step func(ctx context.Context) error) error {
	wait, attemptTime := startupBackoff.first, startupBackoff.firstAttempt
	start := time.Now()
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, attemptTime)
		attemptTime = min(2*attemptTime, startupBackoff.maxAttempt)
		err := step(actx)
		cancel()
		if err == nil {
			if attempt > 1 {
				log.Info("ready after waiting", "for", what, "waited", time.Since(start).Round(time.Millisecond), "attempts", attempt)
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !Transient(err) {
			return err
		}
		log.Warn("waiting for NATS JetStream", "for", what, "attempt", attempt, "since", time.Since(start).Round(time.Second), "retry_in", wait, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait + rand.N(wait/2)):
		}
		wait = min(2*wait, startupBackoff.max)
	}
}

// ConsumerCreator is what CreateConsumer needs of JetStream.
type ConsumerCreator interface {
	CreateOrUpdateConsumer(ctx context.Context, stream string, cfg jetstream.ConsumerConfig) (jetstream.Consumer, error)
}

// CreateConsumer creates or updates a durable consumer, waiting out a
// cluster that cannot place it yet (no leader, insufficient resources).
func CreateConsumer(ctx context.Context, js ConsumerCreator, log *slog.Logger, stream string, cfg jetstream.ConsumerConfig) (jetstream.Consumer, error) {
	var cons jetstream.Consumer
	err := RetryStartup(ctx, log, "consumer "+cfg.Durable+" on "+stream, func(ctx context.Context) (err error) {
		cons, err = js.CreateOrUpdateConsumer(ctx, stream, cfg)
		return err
	})
	return cons, err
}

// Pull requests of the engines' and workers' durable consumers expire
// after PullExpiry and carry a heartbeat every PullHeartbeat: when the
// node leading a consumer dies, its pull requests die with it, and the
// client learns it only by missing two heartbeats (nats.go's default: 5 s
// heartbeats on 30 s requests, so 10 s on top of the election).
const (
	PullExpiry    = 5 * time.Second
	PullHeartbeat = time.Second
)

// PullOpts are the Consume options of every durable consumer: the batch
// size plus the expiry and heartbeat above.
func PullOpts(maxMessages int) []jetstream.PullConsumeOpt {
	return []jetstream.PullConsumeOpt{
		jetstream.PullMaxMessages(maxMessages),
		jetstream.PullExpiry(PullExpiry),
		jetstream.PullHeartbeat(PullHeartbeat),
	}
}

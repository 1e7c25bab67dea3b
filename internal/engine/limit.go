package engine

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/time/rate"

	"github.com/vmherd/vmherd/internal/fsm"
)

// RateLimit bounds the commands one issuer (the last token of
// vm.cmd.<vm>.<action>.<issuer>, pinned to the identity by the server's
// permissions) has decided per second. Commands without an issuer token
// come from full-trust identities (admin, engine) and are not limited.
type RateLimit struct {
	PerSecond float64 // 0: no limit
	Burst     int
}

// issuerLimits holds a token bucket per issuer.
type issuerLimits struct {
	limit RateLimit
	mu    sync.Mutex
	m     map[string]*rate.Limiter
}

// maxIssuers bounds the buckets kept; beyond it, full (idle) ones go.
const maxIssuers = 4096

func newIssuerLimits(l RateLimit) *issuerLimits {
	if l.Burst < 1 {
		l.Burst = 1
	}
	return &issuerLimits{limit: l, m: map[string]*rate.Limiter{}}
}

// allow takes a token from issuer's bucket.
func (l *issuerLimits) allow(issuer string, now time.Time) bool {
	if issuer == "" || l.limit.PerSecond <= 0 {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.m[issuer]
	if !ok {
		if len(l.m) >= maxIssuers {
			for k, v := range l.m {
				if v.TokensAt(now) >= float64(l.limit.Burst) {
					delete(l.m, k)
				}
			}
		}
		b = rate.NewLimiter(rate.Limit(l.limit.PerSecond), l.limit.Burst)
		l.m[issuer] = b
	}
	return b.AllowN(now, 1)
}

func (l *issuerLimits) reason(issuer string) string {
	return fmt.Sprintf("rate limit: issuer %s sent more than %g commands/s (burst %d); send the command again later",
		issuer, l.limit.PerSecond, l.limit.Burst)
}

// rejectOverRate stores the rejection of a command over its issuer's rate
// and acks the command once the rejection is stored (or leaves it for
// redelivery). It reads no state and expects no last event, as the
// decision depends on neither, and publishes asynchronously: so a flood
// from one issuer is rejected about as fast as the server stores it,
// rather than one command at a time behind the VM's other commands.
func (e *Engine) rejectOverRate(ctx context.Context, msg jetstream.Msg, name, action, issuer string, done func()) {
	md, err := msg.Metadata()
	if err != nil {
		done()
		return
	}
	ev := api.Event{
		VM: name, CommandID: commandID(nil, msg, md.Sequence.Stream), Action: fsm.Action(action), Issuer: issuer,
		Type: api.TypeRejected, Reason: e.limits.reason(issuer), Time: time.Now().UTC(),
	}
	if api.ValidateName(name) != nil {
		go func() {
			defer done()
			e.settle(ctx, msg, func(dctx context.Context) error { return e.appendInvalid(dctx, ev, ev.Reason) })
		}()
		return
	}
	f, err := e.store.AppendAsync(&ev, api.DecisionMsgID(name, ev.CommandID))
	if err != nil {
		e.log.Warn("storing a rate-limit rejection failed; the command will be redelivered", "subject", msg.Subject(), "err", err)
		_ = msg.NakWithDelay(time.Second)
		done()
		return
	}
	go func() {
		defer done()
		select {
		case ack := <-f.Ok():
			if ack.Duplicate {
				// Decided before (a redelivery the server counted as a
				// first delivery after a crash): decide it as usual,
				// which follows the decision stored then (the append's
				// concurrency check orders it with the VM's others).
				e.handle(ctx, msg)
				return
			}
			e.cfg.Metrics.Decided(action, string(ev.Type), md.Timestamp)
			_ = msg.Ack()
		case err := <-f.Err():
			e.log.Warn("storing a rate-limit rejection failed; the command will be redelivered", "subject", msg.Subject(), "err", err)
			_ = msg.NakWithDelay(time.Second)
		}
	}()
}

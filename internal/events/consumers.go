package events

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// DropConsumer deletes an ephemeral consumer its maker is done with, so
// that it does not stay on the server until its inactive threshold (an
// ordered consumer's is 5 minutes unless set). It uses a context of its
// own, so it also runs after the maker's was cancelled (Ctrl-C), and
// ignores errors: the threshold is the backstop.
func DropConsumer(st jetstream.Stream, cons jetstream.Consumer) {
	info := cons.CachedInfo()
	if info == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = st.DeleteConsumer(ctx, info.Name)
}

// ReaderIdle is the inactive threshold of the ephemeral consumers that
// whole-stream readers make (vmctl events, engine rebuild, tests): they
// delete them when done (DropConsumer), and the server drops one whose
// reader died after this long without a pull request.
const ReaderIdle = 5 * time.Second

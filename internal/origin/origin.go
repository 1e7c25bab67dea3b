// Package origin tells the messages a client published itself from those
// the NATS server published on a client's behalf, which no permission
// checks: a JetStream consumer delivers stored messages to whatever
// deliver subject its creator chose (push) or whatever reply subject a
// pull request named, a direct get answers on the request's reply
// subject, and every request's answer goes to the reply subject its
// sender chose. The server checks none of these subjects against what
// the client may publish (nats-server #8274), so a viewer could type a
// stored event into a VM's console, or make a worker remove an image, by
// naming the console's or the image service's subject.
//
// Such messages carry marks the server puts on them and clients do not:
// a consumer's delivery has a $JS.ACK (or flow-control $JS.FC) reply
// subject; a direct get's answer has Nats-Stream and Nats-Sequence
// headers; a status has a Status header. Answers (of the JetStream API or
// of a service) carry none, but they have no reply subject, and every
// vmherd request has one, on an inbox. The worker's services keep to
// requests that pass Request, and its console and tunnel inputs drop
// Relayed messages. docs/trust.md has the rest.
package origin

import (
	"fmt"
	"log/slog"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// Relayed reports whether a message bears a mark of a server relay: a
// JetStream reply subject ($JS.ACK.…, $JS.FC.…: a consumer's delivery),
// or a header only the server sets (Nats-Stream, Nats-Sequence: a direct
// get's answer; Status: a status message).
func Relayed(reply string, h nats.Header) bool {
	if strings.HasPrefix(reply, "$JS.") {
		return true
	}
	for _, k := range []string{"Nats-Stream", "Nats-Sequence", "Status"} {
		if h.Get(k) != "" {
			return true
		}
	}
	return false
}

// Inbox reports whether subject is in an inbox: its first token starts
// with _INBOX (NATS's default _INBOX, vmherd's identities' own prefixes).
// No stream or service of vmherd's listens there.
func Inbox(subject string) bool {
	return strings.HasPrefix(subject, "_INBOX")
}

// Request checks a request to a service: it must come with a reply
// subject in an inbox and bear no mark of a server relay. A copy the
// server published on someone's behalf fails: a consumer's delivery has a
// $JS.ACK reply, an answer none.
func Request(reply string, h nats.Header) error {
	switch {
	case reply == "":
		return fmt.Errorf("no reply subject")
	case !Inbox(reply):
		return fmt.Errorf("reply subject %q is not an inbox", reply)
	case Relayed(reply, h):
		return fmt.Errorf("relayed by the server")
	}
	return nil
}

// Guard wraps a service endpoint's handler: requests that fail Request
// are dropped unanswered (their reply subject is no one's inbox) and
// logged.
func Guard(log *slog.Logger, h micro.Handler) micro.Handler {
	return micro.HandlerFunc(func(req micro.Request) {
		if err := Request(req.Reply(), nats.Header(req.Headers())); err != nil {
			if log != nil {
				log.Warn("refused a request the server relayed on someone's behalf", "subject", req.Subject(), "reply", req.Reply(), "why", err)
			}
			return
		}
		h.Handle(req)
	})
}

package events

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Raw is a message read from a stream by ReadStream.
type Raw struct {
	Seq     uint64
	Subject string
	Data    []byte
	Time    time.Time
	// Relayed: the server stored it on someone's behalf (StoredByServer):
	// its subject's writer token is not authenticated.
	Relayed bool
}

// ReadStream reads up to max messages of stream matching filter (a
// subject pattern, ">" for all) with sequence >= from, in order, by one
// batched direct get: no consumer is created, so a reader that dies leaves
// nothing behind. more says whether the server holds further matches.
func ReadStream(ctx context.Context, js KVReader, stream, filter string, from uint64, max int) (out []Raw, more bool, err error) {
	if from == 0 {
		from = 1
	}
	o := js.Options()
	prefix := o.APIPrefix
	if prefix == "" {
		prefix = jetstream.DefaultAPIPrefix
	}
	if prefix[len(prefix)-1] != '.' {
		prefix += "."
	}
	nc := js.Conn()
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil, false, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	req, _ := json.Marshal(map[string]any{"seq": from, "next_by_subj": filter, "batch": max})
	if err := nc.PublishRequest(prefix+"DIRECT.GET."+stream, inbox, req); err != nil {
		return nil, false, err
	}
	for {
		m, err := sub.NextMsg(timeLeft(ctx))
		if err != nil {
			if errors.Is(err, nats.ErrTimeout) && ctx.Err() != nil {
				err = ctx.Err()
			}
			return out, more, fmt.Errorf("reading %s from %d: %w", stream, from, err)
		}
		switch status := m.Header.Get("Status"); status {
		case "":
		case "404": // nothing (more) matches
			return out, false, nil
		case "204": // end of this batch
			return out, more, nil
		case "408":
			return out, more, fmt.Errorf("reading %s from %d: %w", stream, from, nats.ErrTimeout)
		case "503": // no responders: the stream's leader is not there (yet)
			return out, more, fmt.Errorf("reading %s from %d: %w", stream, from, nats.ErrNoResponders)
		default:
			return out, more, fmt.Errorf("reading %s from %d: status %s %s", stream, from, status, m.Header.Get("Description"))
		}
		r := Raw{Data: m.Data}
		// The server appends its own Nats-Sequence, Nats-Subject and
		// Nats-Time-Stamp after the stored message's headers: the last of
		// each is the stored message's place; more than one sequence is a
		// stored answer of another direct get (see storedAs).
		seqs := m.Header.Values(jetstream.SequenceHeader)
		subjs := m.Header.Values(jetstream.SubjectHeader)
		times := m.Header.Values(jetstream.TimeStampHeaer)
		if len(seqs) == 0 || len(subjs) == 0 {
			return out, more, fmt.Errorf("reading %s: a direct get answer without sequence or subject", stream)
		}
		if r.Seq, err = strconv.ParseUint(seqs[len(seqs)-1], 10, 64); err != nil {
			return out, more, fmt.Errorf("reading %s: bad sequence header: %w", stream, err)
		}
		r.Subject = subjs[len(subjs)-1]
		if len(times) > 0 {
			r.Time, _ = time.Parse(time.RFC3339Nano, times[len(times)-1])
		}
		r.Relayed = len(seqs) > 1 || m.Header.Get("Nats-Stream") != "" && len(m.Header.Values("Nats-Stream")) > 1
		more = m.Header.Get("Nats-Num-Pending") != "0"
		out = append(out, r)
	}
}

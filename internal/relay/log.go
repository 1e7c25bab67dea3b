package relay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go"
)

// LogChunk bounds one log reply (a NATS message must stay under the
// server's max payload, 1 MiB by default).
const LogChunk = 512 << 10

// LogRequest is what a log request asks for.
type LogRequest struct {
	From    uint64 // with HasFrom: read from this byte offset
	HasFrom bool
	Tail    int // without From: only the last Tail lines (-1: all)
}

// LogPart is a piece of a console log.
type LogPart struct {
	Data   []byte
	Offset uint64 // of Data's first byte
	Next   uint64 // where to continue
}

// History reads what a console printed from byte offset from (hasFrom),
// or all of it, for a backend that keeps its console's output itself
// (propolis-server) rather than in a file; next is the offset after it.
type History func(ctx context.Context, ep api.ConsoleEndpoint, from uint64, hasFrom bool) (data []byte, next uint64, err error)

// ReadLog reads a piece of the console log behind ep, on the VM's host:
// the log file (QEMU), or what history returns (nil: no log).
func ReadLog(ctx context.Context, ep api.ConsoleEndpoint, req LogRequest, history History) (LogPart, error) {
	if ep.LogPath != "" {
		return readLogFile(ep.LogPath, req)
	}
	if history == nil {
		return LogPart{}, fmt.Errorf("this VM keeps no console log (console kind %q)", ep.Kind)
	}
	data, next, err := history(ctx, ep, req.From, req.HasFrom)
	if err != nil {
		return LogPart{}, err
	}
	if req.HasFrom && next < req.From {
		next = req.From
	}
	if !req.HasFrom {
		data = LastLines(data, req.Tail)
		if len(data) > LogChunk {
			data = data[len(data)-LogChunk:]
		}
	} else if len(data) > LogChunk {
		data = data[:LogChunk]
		next = req.From + LogChunk
	}
	return LogPart{Data: data, Offset: next - uint64(len(data)), Next: next}, nil
}

func readLogFile(path string, req LogRequest) (LogPart, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return LogPart{}, nil // the VM has not written anything yet
	}
	if err != nil {
		return LogPart{}, fmt.Errorf("reading the console log: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return LogPart{}, err
	}
	size := uint64(fi.Size())
	from := req.From
	if !req.HasFrom {
		from = 0
		if req.Tail >= 0 && size > 4*LogChunk {
			from = size - 4*LogChunk // the tail lines are within the last bit
		}
	}
	if from > size {
		// Rotated (QEMU's log: copied to path.1, then truncated) or
		// replaced since the last read. path.1 is the old file, so the
		// offset is still good there: finish it first, then go on from
		// the start of the live file.
		if part, ok := readRotated(path+".1", from); ok {
			return part, nil
		}
		from = 0
	}
	n := min(size-from, LogChunk)
	if !req.HasFrom && req.Tail >= 0 {
		n = size - from
	}
	buf := make([]byte, n)
	k, err := f.ReadAt(buf, int64(from))
	if err != nil && !errors.Is(err, io.EOF) {
		return LogPart{}, fmt.Errorf("reading the console log: %w", err)
	}
	buf = buf[:k]
	part := LogPart{Data: buf, Offset: from, Next: from + uint64(k)}
	if !req.HasFrom && req.Tail >= 0 {
		if from == 0 && lineCount(buf) < req.Tail {
			// Just rotated: the rest of the lines are in path.1.
			buf = append(lastBytes(path+".1", 4*LogChunk), buf...)
		}
		part.Data = LastLines(buf, req.Tail)
		if len(part.Data) > LogChunk { // many long lines: the last LogChunk bytes
			part.Data = part.Data[len(part.Data)-LogChunk:]
		}
		// Lines taken from path.1 have no offset in the live file.
		part.Offset = part.Next - min(part.Next, uint64(len(part.Data)))
	}
	return part, nil
}

// readRotated reads from offset from of the rotated log at path, if
// from is inside it.
func readRotated(path string, from uint64) (LogPart, bool) {
	f, err := os.Open(path)
	if err != nil {
		return LogPart{}, false
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || from >= uint64(fi.Size()) {
		return LogPart{}, false
	}
	buf := make([]byte, min(uint64(fi.Size())-from, LogChunk))
	k, err := f.ReadAt(buf, int64(from))
	if err != nil && !errors.Is(err, io.EOF) {
		return LogPart{}, false
	}
	return LogPart{Data: buf[:k], Offset: from, Next: from + uint64(k)}, true
}

// lastBytes is the last n bytes of the file at path (nil if none).
func lastBytes(path string, n int64) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil
	}
	from := max(fi.Size()-n, 0)
	buf := make([]byte, fi.Size()-from)
	k, _ := f.ReadAt(buf, from)
	return buf[:k]
}

func lineCount(b []byte) int { return bytes.Count(b, []byte{'\n'}) }

// LastLines returns the last n lines of b (all of b when n < 0).
func LastLines(b []byte, n int) []byte {
	if n < 0 {
		return b
	}
	end := len(b)
	if end > 0 && b[end-1] == '\n' {
		end--
	}
	i := end
	for ; n > 0 && i > 0; n-- {
		j := bytes.LastIndexByte(b[:i], '\n')
		if j < 0 {
			return b
		}
		i = j
		if n == 1 {
			return b[i+1:]
		}
	}
	if n > 0 {
		return b
	}
	return b[len(b):]
}

// EncodeLogRequest is the request message for a log piece.
func EncodeLogRequest(subject string, req LogRequest) *nats.Msg {
	m := nats.NewMsg(subject)
	if req.HasFrom {
		m.Header.Set(HdrOffset, strconv.FormatUint(req.From, 10))
	} else {
		m.Header.Set(HdrTail, strconv.Itoa(req.Tail))
	}
	return m
}

// DecodeLogRequest reads a log request's headers.
func DecodeLogRequest(h nats.Header) (LogRequest, error) {
	req := LogRequest{Tail: -1}
	from, ok, err := headerUint(h, HdrOffset)
	if err != nil {
		return req, err
	}
	req.From, req.HasFrom = from, ok
	if t := h.Get(HdrTail); t != "" && !ok {
		n, err := strconv.Atoi(t)
		if err != nil || n < -1 {
			return req, fmt.Errorf("header %s: %q is not a number of lines (or -1)", HdrTail, t)
		}
		req.Tail = n
	}
	return req, nil
}

// LogReply is the reply message carrying part.
func LogReply(part LogPart) (data []byte, headers nats.Header) {
	h := nats.Header{}
	h.Set(HdrOffset, strconv.FormatUint(part.Offset, 10))
	h.Set(HdrNext, strconv.FormatUint(part.Next, 10))
	return part.Data, h
}

// FollowEvery is how often a followed log asks for more.
const FollowEvery = 200 * time.Millisecond

// PrintLog prints vmName's console log through the worker of its host
// (the last tail lines first, -1: all) and, with follow, what the guest
// writes after, until ctx ends.
func PrintLog(ctx context.Context, nc *nats.Conn, names api.Names, host, vmName string, out io.Writer, tail int, follow bool) error {
	return FollowLog(ctx, nc, names, host, vmName, out, tail, follow, nil)
}

// FollowLog is PrintLog that, when following, rides out a worker or a
// connection that goes away for a while (a restart, a NATS election): it
// asks again from where it was, and tells trouble (nil: quiet) when the
// reads start failing (with the error) and when they work again (nil).
func FollowLog(ctx context.Context, nc *nats.Conn, names api.Names, host, vmName string, out io.Writer, tail int, follow bool, trouble func(error)) error {
	subj := names.Log(host, vmName)
	req := LogRequest{Tail: tail}
	failing := false
	for {
		rctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		rep, err := nc.RequestMsgWithContext(rctx, EncodeLogRequest(subj, req))
		cancel()
		if err == nil {
			err = replyErr(rep)
		}
		var re *ReplyError
		switch {
		case err == nil:
			if failing && trouble != nil {
				trouble(nil)
			}
			failing = false
		case ctx.Err() != nil:
			return nil
		case follow && !errors.As(err, &re) && !errors.Is(err, nats.ErrConnectionClosed):
			// No answer (timeout, no responders): the worker or the
			// connection is away; the log is still there.
			if !failing && trouble != nil {
				trouble(requestErr("reading the console log", err))
			}
			failing = true
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(time.Second):
			}
			continue
		default:
			return requestErr("reading the console log", err)
		}
		next, ok, herr := headerUint(rep.Header, HdrNext)
		if herr != nil || !ok {
			return fmt.Errorf("reading the console log: the worker's reply has no valid %s header", HdrNext)
		}
		if _, err := out.Write(rep.Data); err != nil {
			return err
		}
		req = LogRequest{From: next, HasFrom: true}
		if len(rep.Data) == LogChunk {
			continue // more is there already
		}
		if !follow {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(FollowEvery):
		}
	}
}

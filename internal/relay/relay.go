// Package relay carries a VM's serial console, its console log and TCP
// connections to its guest over NATS, so that vmctl reaches them from any
// machine on the bus. The worker of the VM's host runs the far end (a Hub
// per console, a log reader, one Splice per tunnel); vmctl runs the near
// end (AttachConsole, ReadLog, DialTunnel). docs/contract.md, "Console,
// logs and tunnels", is the wire contract.
//
// Every subject names the VM's host and the VM (events.Names.Console,
// Log, Tunnel), so a worker may answer only for its own host and the
// roles decide who may attach (docs/trust.md).
package relay

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go"
)

// Headers of the relay's messages.
const (
	// HdrOffset: on console output, the byte offset of the chunk's first
	// byte in everything the hub has read; on an attach reply, the offset
	// just after the replayed output; on a log request, where to read from
	// (absent: from the start, or the tail); on a log reply, the offset of
	// the first byte returned.
	HdrOffset = "Vmherd-Offset"
	// HdrNext, on a log reply: the offset to ask for next (follow).
	HdrNext = "Vmherd-Next"
	// HdrTail, on a log request without an offset: only the last N lines.
	HdrTail = "Vmherd-Tail"
	// HdrClosed, on console output: the console ended (the VM stopped);
	// the value says why. On tunnel frames: the tunnel ended, and why.
	HdrClosed = "Vmherd-Closed"
	// HdrPort, on a tunnel open: the guest's TCP port.
	HdrPort = "Vmherd-Port"
	// HdrSeq, on tunnel data: the frame's number, from 0 per direction.
	HdrSeq = "Vmherd-Seq"
	// HdrAck, on a tunnel window update: "<bytes>,<frames>" the receiver
	// has consumed so far.
	HdrAck = "Vmherd-Ack"
	// HdrEOF, on a tunnel frame: the sender will send no more data
	// (its side of the connection reached EOF).
	HdrEOF = "Vmherd-Eof"
	// HdrKey, on a tunnel open's reply: the tunnel's key, which the
	// client puts on every frame it sends (up); the worker drops frames
	// without it, so only whoever received the reply (its inbox) uses
	// the tunnel.
	HdrKey = "Vmherd-Key"
	// HdrPing, on a tunnel frame or console output without data: liveness
	// only (the hub pings every ConsolePing while the console is quiet).
	HdrPing = "Vmherd-Ping"
)

// micro's error headers: the worker answers requests as a NATS micro
// service endpoint.
const (
	hdrServiceError     = "Nats-Service-Error"
	hdrServiceErrorCode = "Nats-Service-Error-Code"
)

// ReplyError is a worker's error reply to a relay request.
type ReplyError struct {
	Code    string
	Message string
}

func (e *ReplyError) Error() string { return e.Message }

// ErrNoResponders: no worker answers for the VM's host.
var ErrNoResponders = errors.New("no worker answers for the VM's host (is it running and connected?)")

// replyErr returns the error a reply carries, if any.
func replyErr(m *nats.Msg) error {
	if m.Header == nil {
		return nil
	}
	if code := m.Header.Get(hdrServiceErrorCode); code != "" {
		return &ReplyError{Code: code, Message: m.Header.Get(hdrServiceError)}
	}
	return nil
}

func requestErr(what string, err error) error {
	if errors.Is(err, nats.ErrNoResponders) {
		return fmt.Errorf("%s: %w", what, ErrNoResponders)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// headerUint reads a non-negative integer header; ok is false when it is
// absent.
func headerUint(h nats.Header, key string) (v uint64, ok bool, err error) {
	s := h.Get(key)
	if s == "" {
		return 0, false, nil
	}
	v, err = strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("header %s: %q is not a non-negative integer", key, s)
	}
	return v, true, nil
}

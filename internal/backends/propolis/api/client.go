package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ErrUnreachable: no propolis-server answers at the address (nothing
// listens, or the host cannot be reached).
var ErrUnreachable = errors.New("propolis-server is unreachable")

// ErrBodyTooLarge: a request body over MaxRequestBody, which the server
// would refuse.
var ErrBodyTooLarge = errors.New("request body exceeds propolis-server's 1 MiB limit")

// ErrInstanceEnded: the instance reached Failed or Destroyed while the
// client waited for another state.
var ErrInstanceEnded = errors.New("propolis instance ended")

// Code is an error code from an Error body. errors.Is(err, ErrNoInstance)
// matches any APIError carrying that code.
type Code string

func (c Code) Error() string { return "propolis error code " + string(c) }

// Codes as errors, for errors.Is.
var (
	ErrNoInstance         = Code(CodeNoInstance)
	ErrAlreadyInitialized = Code(CodeAlreadyInitialized)
)

// APIError is a non-success answer from propolis-server.
type APIError struct {
	Addr   string // server address
	Method string
	Path   string
	Status int
	Body   Error // decoded error body (Message is the raw body if it was not JSON)
}

func (e *APIError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "propolis-server at %s answered %s %s with %d %s", e.Addr, e.Method, e.Path, e.Status, http.StatusText(e.Status))
	if e.Body.ErrorCode != "" {
		fmt.Fprintf(&b, ": %s", e.Body.ErrorCode)
	}
	if e.Body.Message != "" {
		fmt.Fprintf(&b, ": %s", e.Body.Message)
	}
	if e.Body.RequestID != "" {
		fmt.Fprintf(&b, " (request id %s)", e.Body.RequestID)
	}
	return b.String()
}

// Is matches a Code against the error's error_code.
func (e *APIError) Is(target error) bool {
	c, ok := target.(Code)
	return ok && e.Body.ErrorCode == string(c)
}

// StatusOf returns the HTTP status of an APIError in err's chain, or 0.
func StatusOf(err error) int {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.Status
	}
	return 0
}

// Client talks to one propolis-server. It is safe for concurrent use.
type Client struct {
	addr    string
	hc      *http.Client
	timeout time.Duration
	poll    time.Duration
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient sets the HTTP client (default: a client without a global
// timeout; deadlines come from contexts).
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.hc = hc } }

// WithTimeout bounds each request whose context has no deadline (default 30s).
func WithTimeout(d time.Duration) Option { return func(c *Client) { c.timeout = d } }

// New returns a client for the server at addr (host:port).
func New(addr string, opts ...Option) *Client {
	c := &Client{addr: addr, hc: &http.Client{}, timeout: 30 * time.Second, poll: 20 * time.Second}
	for _, o := range opts {
		o(c)
	}
	return c
}

// Addr is the server's host:port.
func (c *Client) Addr() string { return c.addr }

// SerialURL is the WebSocket URL of the serial console.
func (c *Client) SerialURL(q HistoryQuery) string {
	u := url.URL{Scheme: "ws", Host: c.addr, Path: "/instance/serial", RawQuery: q.values().Encode()}
	return u.String()
}

// Headers are the headers every request carries (the WebSocket upgrade too).
func Headers() http.Header {
	h := http.Header{}
	h.Set(VersionHeader, Version)
	return h
}

func (q HistoryQuery) values() url.Values {
	v := url.Values{}
	if q.FromStart != nil {
		v.Set("from_start", strconv.FormatUint(*q.FromStart, 10))
	}
	if q.MostRecent != nil {
		v.Set("most_recent", strconv.FormatUint(*q.MostRecent, 10))
	}
	if q.MaxBytes != nil {
		v.Set("max_bytes", strconv.FormatUint(*q.MaxBytes, 10))
	}
	return v
}

// Get returns the instance (GET /instance). Before the first ensure the
// server answers 424 NoInstance: errors.Is(err, ErrNoInstance).
func (c *Client) Get(ctx context.Context) (Instance, error) {
	var r GetResponse
	err := c.do(ctx, http.MethodGet, "/instance", nil, nil, http.StatusOK, &r)
	return r.Instance, err
}

// Ensure creates the instance (PUT /instance); it is not started. A server
// that already has a live instance answers 409 AlreadyInitialized.
func (c *Client) Ensure(ctx context.Context, req EnsureRequest) error {
	body, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encoding the instance ensure request: %w", err)
	}
	return c.do(ctx, http.MethodPut, "/instance", nil, body, http.StatusCreated, &EnsureResponse{})
}

// PutState asks for a state change (PUT /instance/state): Run, Stop (a hard
// halt) or Reboot.
func (c *Client) PutState(ctx context.Context, s StateRequest) error {
	body, _ := json.Marshal(s)
	return c.do(ctx, http.MethodPut, "/instance/state", nil, body, http.StatusNoContent, nil)
}

// StateMonitor answers once the state generation is at least gen (a long
// poll bounded by ctx).
func (c *Client) StateMonitor(ctx context.Context, gen uint64) (StateMonitorResponse, error) {
	body, _ := json.Marshal(StateMonitorRequest{Gen: gen})
	var r StateMonitorResponse
	err := c.do(ctx, http.MethodGet, "/instance/state-monitor", nil, body, http.StatusOK, &r)
	return r, err
}

// SerialHistory returns buffered serial console bytes.
func (c *Client) SerialHistory(ctx context.Context, q HistoryQuery) (SerialHistory, error) {
	var r SerialHistory
	err := c.do(ctx, http.MethodGet, "/instance/serial/history", q.values(), nil, http.StatusOK, &r)
	return r, err
}

// WaitFor long-polls the state monitor until the instance is in one of
// want, and returns that answer. It fails with ErrInstanceEnded if the
// instance reaches Failed or Destroyed (and that is not wanted), and with
// the context's error when ctx ends.
func (c *Client) WaitFor(ctx context.Context, want ...InstanceState) (StateMonitorResponse, error) {
	var last StateMonitorResponse
	gen := uint64(0)
	for {
		pctx, cancel := context.WithTimeout(ctx, c.poll)
		r, err := c.StateMonitor(pctx, gen)
		cancel()
		switch {
		case err == nil:
		case ctx.Err() != nil:
			return last, fmt.Errorf("waiting for the instance on %s to be %s (last state %s): %w", c.addr, joinStates(want), orNone(last.State), ctx.Err())
		case errors.Is(err, context.DeadlineExceeded):
			continue // the poll ended without a change; ask again
		case StatusOf(err) == http.StatusGone:
			// The instance will never change again: read its final state.
			inst, gerr := c.Get(ctx)
			if gerr != nil {
				return last, err
			}
			r = StateMonitorResponse{Gen: last.Gen, State: inst.State}
		default:
			return last, fmt.Errorf("waiting for the instance on %s to be %s (last state %s): %w", c.addr, joinStates(want), orNone(last.State), err)
		}
		last = r
		if slices.Contains(want, r.State) {
			return r, nil
		}
		if r.State.Terminal() {
			return r, fmt.Errorf("%w: the instance on %s is %s while waiting for %s", ErrInstanceEnded, c.addr, r.State, joinStates(want))
		}
		gen = r.Gen + 1
	}
}

func joinStates(s []InstanceState) string {
	parts := make([]string, len(s))
	for i, x := range s {
		parts[i] = string(x)
	}
	return strings.Join(parts, " or ")
}

func orNone(s InstanceState) InstanceState {
	if s == "" {
		return "unknown"
	}
	return s
}

// do sends one request and decodes a success answer into out. GETs are
// retried while the server answers 503.
func (c *Client) do(ctx context.Context, method, path string, query url.Values, body []byte, want int, out any) error {
	if len(body) > MaxRequestBody {
		return fmt.Errorf("%s %s to %s: %w (%d bytes)", method, path, c.addr, ErrBodyTooLarge, len(body))
	}
	backoff := 50 * time.Millisecond
	for attempt := 0; ; attempt++ {
		err := c.once(ctx, method, path, query, body, want, out)
		if err == nil || method != http.MethodGet || StatusOf(err) != http.StatusServiceUnavailable || attempt >= 8 {
			return err
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		backoff = min(2*backoff, time.Second)
	}
}

func (c *Client) once(ctx context.Context, method, path string, query url.Values, body []byte, want int, out any) error {
	if _, ok := ctx.Deadline(); !ok && c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	u := url.URL{Scheme: "http", Host: c.addr, Path: path}
	if len(query) > 0 {
		u.RawQuery = query.Encode()
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return fmt.Errorf("building %s %s for %s: %w", method, path, c.addr, err)
	}
	req.Header = Headers()
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return c.transportError(method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("reading the answer of propolis-server at %s to %s %s: %w", c.addr, method, path, err)
	}
	if resp.StatusCode != want {
		return decodeError(c.addr, method, path, resp.StatusCode, data)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decoding the answer of propolis-server at %s to %s %s: %w", c.addr, method, path, err)
	}
	return nil
}

// decodeError turns an error answer into an APIError.
func decodeError(addr, method, path string, status int, data []byte) *APIError {
	e := &APIError{Addr: addr, Method: method, Path: path, Status: status}
	if err := json.Unmarshal(data, &e.Body); err != nil || (e.Body.Message == "" && e.Body.ErrorCode == "") {
		e.Body = Error{Message: strings.TrimSpace(string(data))}
	}
	return e
}

// DecodeError reads an error answer (for callers that send their own
// requests, like the serial WebSocket upgrade).
func DecodeError(addr, method, path string, resp *http.Response) error {
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return decodeError(addr, method, path, resp.StatusCode, data)
}

func (c *Client) transportError(method, path string, err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return fmt.Errorf("%w at %s (%s %s): %w; check that propolis-server runs and listens there", ErrUnreachable, c.addr, method, path, err)
	}
	return fmt.Errorf("propolis-server at %s did not answer %s %s: %w", c.addr, method, path, err)
}

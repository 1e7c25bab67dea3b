package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
)

// Record reads a VM's record from VM_RECORDS (a *NotFoundError, errors.Is
// ErrNotFound, when the VM has none: never prepared, or purged).
func (c *Client) Record(ctx context.Context, name string) (*api.VmRecord, error) {
	if err := api.ValidateName(name); err != nil {
		return nil, err
	}
	kv, err := c.recordsKV(ctx)
	if err != nil {
		return nil, err
	}
	e, err := kv.Get(ctx, name)
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			return nil, &NotFoundError{VM: name}
		}
		return nil, notAllowed(fmt.Errorf("reading the record of %s: %w", name, err))
	}
	return api.UnmarshalRecord(e.Value())
}

// Records reads every record, destroyed ones included, sorted by name. It
// reads the bucket by batched direct gets and creates nothing on the
// server.
func (c *Client) Records(ctx context.Context) ([]*api.VmRecord, error) {
	es, err := events.KVEntries(ctx, c.js, c.names.RecordsBucket(), "")
	if err != nil {
		return nil, c.wrapSetup(err, c.names.RecordsBucket())
	}
	out := make([]*api.VmRecord, 0, len(es))
	for _, e := range es {
		if r, err := api.UnmarshalRecord(e.Value()); err == nil {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Stored is an event as the stream keeps it: its sequence and either a
// VM's event or a host's.
type Stored struct {
	Seq  uint64
	Time time.Time
	// Event is a VM's event (vm.evt.<vm>.<type>.<writer>, Writer set from
	// the subject), HostEvent a host's (vm.host.<host>.<type>); exactly
	// one is set.
	Event     *api.Event
	HostEvent *api.HostEvent
}

// History reads every event of one VM in stream order, by direct gets.
func (c *Client) History(ctx context.Context, name string) ([]Stored, error) {
	if err := api.ValidateName(name); err != nil {
		return nil, err
	}
	store, err := c.eventStore(ctx)
	if err != nil {
		return nil, err
	}
	evs, err := store.ReadVM(ctx, name, 1)
	if err != nil {
		return nil, notAllowed(err)
	}
	out := make([]Stored, 0, len(evs))
	for _, e := range evs {
		if e.Event != nil {
			out = append(out, Stored{Seq: e.Seq, Time: e.Event.Time, Event: e.Event})
		}
	}
	return out, nil
}

// State asks the worker of the VM's host what the VM is doing now (the
// record says what it did last).
func (c *Client) State(ctx context.Context, name string) (*api.StateReply, error) {
	var out api.StateReply
	if err := c.Query(ctx, name, "state", &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// GuestIP asks the worker of the VM's host for the guest's address: IP,
// and for user networking the host port its SSH is forwarded to.
func (c *Client) GuestIP(ctx context.Context, name string) (*api.GuestIPReply, error) {
	var out api.GuestIPReply
	if err := c.Query(ctx, name, "guest_ip", &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Query asks the worker on the VM's host the query endpoint (state,
// guest_ip, ...) and decodes its answer into out. A worker's refusal is a
// *WorkerError.
func (c *Client) Query(ctx context.Context, name, endpoint string, out any) error {
	r, err := c.Record(ctx, name)
	if err != nil {
		return err
	}
	if r.Host == "" {
		return &WorkerError{Code: "409", Message: fmt.Sprintf("vm %s is not placed on a host", name)}
	}
	return c.QueryHost(ctx, r.Host, name, endpoint, out)
}

// QueryHost is Query with the host known.
func (c *Client) QueryHost(ctx context.Context, host, name, endpoint string, out any) error {
	req, _ := json.Marshal(api.QueryRequest{VM: name})
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	m, err := c.nc.RequestWithContext(qctx, c.names.Query(host)+"."+endpoint, req)
	if err != nil {
		if errors.Is(err, nats.ErrNoResponders) {
			return &WorkerError{Host: host, Err: err}
		}
		return &WorkerError{Host: host, Err: notAllowed(err)}
	}
	if code := m.Header.Get("Nats-Service-Error-Code"); code != "" {
		return &WorkerError{Host: host, Code: code, Message: m.Header.Get("Nats-Service-Error")}
	}
	return json.Unmarshal(m.Data, out)
}

package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
)

// Images reads what the workers' image stores hold or are pulling, from
// VM_IMAGES, sorted by name then host. host "" reads every host's; name
// "" every image.
func (c *Client) Images(ctx context.Context, host, name string) ([]api.ImageStatus, error) {
	h, n := host, name
	if h == "" {
		h = "*"
	}
	if n == "" {
		n = "*"
	}
	es, err := events.KVEntries(ctx, c.js, c.names.ImagesBucket(), h+"."+n)
	if err != nil {
		return nil, c.wrapSetup(err, c.names.ImagesBucket())
	}
	var out []api.ImageStatus
	for _, e := range es {
		var st api.ImageStatus
		if json.Unmarshal(e.Value(), &st) == nil {
			out = append(out, st)
		}
	}
	slices.SortFunc(out, func(a, b api.ImageStatus) int {
		if c := strings.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return strings.Compare(a.Host, b.Host)
	})
	return out, nil
}

// PullImage asks host's worker to pull an image into its store; the pull
// goes on in the background and its status shows in Images (WaitImage
// follows it). req.Name "" takes the name from the source
// (api.ImageNameFrom).
func (c *Client) PullImage(ctx context.Context, host string, req api.ImagePullRequest) error {
	if req.Name == "" {
		req.Name = api.ImageNameFrom(req.Source)
	}
	if err := api.ValidateName(req.Name); err != nil {
		return err
	}
	return c.imageRequest(ctx, host, api.ImagePull, req)
}

// RemoveImage removes an image from host's store (refused while a VM on
// the host uses it), or the status a failed pull left.
func (c *Client) RemoveImage(ctx context.Context, host, name string) error {
	return c.imageRequest(ctx, host, api.ImageRemove, api.ImageRemoveRequest{Name: name})
}

func (c *Client) imageRequest(ctx context.Context, host string, op api.ImageOp, body any) error {
	b, _ := json.Marshal(body)
	rctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	m, err := c.nc.RequestWithContext(rctx, c.names.Image(host, op), b)
	if err != nil {
		if errors.Is(err, nats.ErrNoResponders) {
			return &WorkerError{Host: host, Err: err}
		}
		return &WorkerError{Host: host, Err: notAllowed(err)}
	}
	if code := m.Header.Get("Nats-Service-Error-Code"); code != "" {
		return &WorkerError{Host: host, Code: code, Message: m.Header.Get("Nats-Service-Error")}
	}
	return nil
}

// ImageUpdates returns, once it has read where image name stands now on
// every host, a channel of its statuses that change from then on, read
// every interval without a consumer. The channel closes when ctx ends.
func (c *Client) ImageUpdates(ctx context.Context, name string, every time.Duration) (<-chan api.ImageStatus, error) {
	w, err := events.KVPoll(ctx, c.js, c.names.ImagesBucket(), "*."+name, every)
	if err != nil {
		return nil, c.wrapSetup(err, c.names.ImagesBucket())
	}
	out := make(chan api.ImageStatus)
	go func() {
		defer close(out)
		defer func() { _ = w.Stop() }()
		for {
			select {
			case <-ctx.Done():
				return
			case e, ok := <-w.Updates():
				if !ok {
					return
				}
				var st api.ImageStatus
				if e == nil || e.Operation() != jetstream.KeyValuePut || json.Unmarshal(e.Value(), &st) != nil {
					continue
				}
				select {
				case out <- st:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out, nil
}

// ErrPullFailed: a pull ended failed (PullFailedError says where, why).
var ErrPullFailed = errors.New("image pull failed")

// PullFailedError is a pull that failed on some hosts.
type PullFailedError struct {
	Name     string
	Failures map[string]string // host: error
}

func (e *PullFailedError) Error() string {
	var parts []string
	for h, why := range e.Failures {
		parts = append(parts, h+": "+why)
	}
	slices.Sort(parts)
	return fmt.Sprintf("the pull of %s failed on %s", e.Name, strings.Join(parts, "; "))
}

func (e *PullFailedError) Is(target error) bool { return target == ErrPullFailed }

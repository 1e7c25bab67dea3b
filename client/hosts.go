package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/hosts"
)

// Hosts reads every host VM_HOSTS knows: its last heartbeat (backends,
// capacity, usage), its cordon, and whether it is alive. A host is lost
// when an engine stored host_lost about its latest heartbeat (the engines'
// --host-timeout may be shorter than hosts.DefaultLostAfter) or when that
// heartbeat is older than DefaultLostAfter. It reads by direct gets.
func (c *Client) Hosts(ctx context.Context) ([]*api.Host, error) {
	hs, err := hosts.Snapshot(ctx, c.js, c.names.HostsBucket(), hosts.DefaultLostAfter)
	if err != nil {
		return nil, c.wrapSetup(err, c.names.HostsBucket())
	}
	c.judgeLost(ctx, hs)
	return hs, nil
}

// Host reads one host, as Hosts judges it; an unknown host is a
// *UnknownHostError naming the known ones.
func (c *Client) Host(ctx context.Context, name string) (*api.Host, error) {
	hs, err := c.Hosts(ctx)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, h := range hs {
		if h.Host == name {
			return h, nil
		}
		names = append(names, h.Host)
	}
	return nil, &UnknownHostError{Host: name, Known: names}
}

// UnknownHostError is a host VM_HOSTS does not know.
type UnknownHostError struct {
	Host  string
	Known []string
}

func (e *UnknownHostError) Error() string {
	known := strings.Join(e.Known, ", ")
	if known == "" {
		known = "none"
	}
	return fmt.Sprintf("no host named %s (known hosts: %s)", e.Host, known)
}

// HostLost tells whether one host is lost now, judged as Hosts judges it,
// from its own entries only. A host the bucket does not know is not lost.
func (c *Client) HostLost(ctx context.Context, host string) bool {
	kv, err := c.js.KeyValue(ctx, c.names.HostsBucket())
	if err != nil {
		return false
	}
	h, err := hosts.Read(ctx, kv, hosts.DefaultLostAfter, host)
	if err != nil || h == nil {
		return false
	}
	c.judgeLost(ctx, []*api.Host{h})
	return !h.Alive
}

// judgeLost marks lost the hosts an engine wrote host_lost about, at
// their latest heartbeat.
func (c *Client) judgeLost(ctx context.Context, hs []*api.Host) {
	store, err := c.eventStore(ctx)
	if err != nil {
		return
	}
	for _, h := range hs {
		if !h.Alive {
			continue
		}
		m, err := store.Stream().GetLastMsgForSubject(ctx, c.names.HostEvent(h.Host, api.HostLost))
		if err != nil {
			continue
		}
		if ev, err := api.DecodeHostEvent(m.Data); err == nil && ev.Rev == h.Rev {
			h.Alive = false
		}
	}
}

// Cordon stops new VMs from being placed on host (its VMs keep running);
// it reports false when the host was cordoned already.
func (c *Client) Cordon(ctx context.Context, host, reason string) (bool, error) {
	h, err := c.Host(ctx, host)
	if err != nil {
		return false, err
	}
	if h.Cordon != nil {
		return false, nil
	}
	kv, err := c.js.KeyValue(ctx, c.names.HostsBucket())
	if err != nil {
		return false, c.wrapSetup(err, c.names.HostsBucket())
	}
	b, _ := json.Marshal(api.Cordon{Time: time.Now().UTC(), Reason: reason})
	if _, err := kv.Put(ctx, api.CordonKey(host), b); err != nil {
		return false, notAllowed(fmt.Errorf("cordoning %s: %w", host, err))
	}
	return true, nil
}

// Uncordon lets placements go to host again; it reports false when the
// host was not cordoned.
func (c *Client) Uncordon(ctx context.Context, host string) (bool, error) {
	h, err := c.Host(ctx, host)
	if err != nil {
		return false, err
	}
	if h.Cordon == nil {
		return false, nil
	}
	kv, err := c.js.KeyValue(ctx, c.names.HostsBucket())
	if err != nil {
		return false, c.wrapSetup(err, c.names.HostsBucket())
	}
	if err := kv.Delete(ctx, api.CordonKey(host)); err != nil {
		return false, notAllowed(fmt.Errorf("uncordoning %s: %w", host, err))
	}
	return true, nil
}

// ErrHostInUse: the host cannot be forgotten (HostInUseError says why).
var ErrHostInUse = errors.New("host in use")

// HostInUseError is a forget of a host that is alive, or that records
// still place VMs on.
type HostInUseError struct {
	Host  string
	Alive bool
	Since time.Duration // since its last heartbeat (alive)
	VMs   []string
}

func (e *HostInUseError) Error() string {
	if e.Alive {
		return fmt.Sprintf("host %s is alive (last heartbeat %s ago): stop its worker first; only a lost host can be forgotten", e.Host, e.Since.Round(time.Second))
	}
	return fmt.Sprintf("host %s still has VMs in the records: %s; forget each first (destroy with forget)", e.Host, strings.Join(e.VMs, ", "))
}

func (e *HostInUseError) Is(target error) bool { return target == ErrHostInUse }

// ForgetHost removes a lost host with no VMs from VM_HOSTS. Its queued
// tasks stay: if the host comes back after all, its worker still fences
// the VMs that were forgotten.
func (c *Client) ForgetHost(ctx context.Context, host string) error {
	h, err := c.Host(ctx, host)
	if err != nil {
		return err
	}
	if h.Alive {
		return &HostInUseError{Host: host, Alive: true, Since: time.Since(h.Time)}
	}
	recs, err := c.Records(ctx)
	if err != nil {
		return err
	}
	var vms []string
	for _, r := range recs {
		if r.Host == host && r.Live() {
			vms = append(vms, r.Name)
		}
	}
	if len(vms) > 0 {
		return &HostInUseError{Host: host, VMs: vms}
	}
	kv, err := c.js.KeyValue(ctx, c.names.HostsBucket())
	if err != nil {
		return c.wrapSetup(err, c.names.HostsBucket())
	}
	if err := kv.Delete(ctx, api.CordonKey(host)); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return notAllowed(err)
	}
	if err := kv.Delete(ctx, host); err != nil {
		return notAllowed(fmt.Errorf("forgetting host %s: %w", host, err))
	}
	return nil
}

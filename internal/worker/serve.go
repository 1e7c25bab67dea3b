package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/origin"
	"github.com/vmherd/vmherd/internal/relay"
)

// Heartbeat returns what the worker publishes in VM_HOSTS.
func (w *Worker) Heartbeat() api.Heartbeat {
	r := w.cfg.Router
	hb := api.Heartbeat{
		Host:           w.cfg.Host,
		Version:        Version,
		Time:           time.Now().UTC(),
		Backends:       r.Tags(),
		DefaultBackend: r.Default(),
		Capabilities:   map[api.BackendTag]api.Capabilities{},
		Capacity:       w.cfg.Capacity,
		Tasks:          api.TaskSettings{AckWaitMS: w.cfg.AckWait.Milliseconds(), MaxAckPending: 4 * w.cfg.Concurrency},
	}
	for _, t := range r.Tags() {
		hb.Capabilities[t] = r.Capabilities(t)
	}
	w.mu.Lock()
	for _, l := range w.vms {
		hb.Usage.VMs++
		if l.spec != nil {
			hb.Usage.Vcpus += l.spec.Vcpus
			hb.Usage.MemoryMB += l.spec.MemoryMB
		}
	}
	w.mu.Unlock()
	return hb
}

func (w *Worker) heartbeat(ctx context.Context) error {
	// A cluster still electing the bucket's leader times out: wait it out.
	var kv jetstream.KeyValue
	if err := jsetup.RetryStartup(ctx, w.log, "the hosts bucket", func(sctx context.Context) (err error) {
		kv, err = w.cfg.JS.KeyValue(sctx, w.cfg.Names.HostsBucket())
		return err
	}); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("worker: opening %s: %w", w.cfg.Names.HostsBucket(), err)
	}
	t := time.NewTicker(w.cfg.HeartbeatEvery)
	defer t.Stop()
	for {
		hb := w.Heartbeat()
		b, _ := json.Marshal(hb)
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if _, err := kv.Put(pctx, w.cfg.Host, b); err != nil && ctx.Err() == nil {
			w.log.Warn("heartbeat failed", "err", err)
		}
		cancel()
		select {
		case <-ctx.Done():
			return nil
		case <-w.killCtx.Done():
			return nil
		case <-t.C:
		}
	}
}

// ServiceName is the micro service the workers of host register (`nats
// micro ls`): vmherd-worker-<host>. The host is in the name, not only in
// the metadata, so a discovery request for one host's service
// ($SRV.INFO.vmherd-worker-<host>) is a subject only that host's workers
// need to subscribe to, and a worker's permissions can allow it its own
// name only (docs/trust.md): the metadata is whatever the replier says.
func ServiceName(host string) string { return ServicePrefix + host }

// ServicePrefix begins every worker's micro service name.
const ServicePrefix = "vmherd-worker-"

func (w *Worker) startQueries() (micro.Service, error) {
	svc, err := micro.AddService(w.cfg.NC, micro.Config{
		Name:        ServiceName(w.cfg.Host),
		Version:     Version,
		Description: "vmherd worker: live VM queries for one host",
		Metadata:    map[string]string{"host": w.cfg.Host},
	})
	if err != nil {
		return nil, fmt.Errorf("worker: starting query service: %w", err)
	}
	g := svc.AddGroup(w.cfg.Names.Query(w.cfg.Host))
	add := func(name string, fn func(ctx context.Context, h api.VmHandle) (any, error)) error {
		return g.AddEndpoint(name, origin.Guard(w.log, micro.HandlerFunc(func(req micro.Request) {
			var q api.QueryRequest
			if err := json.Unmarshal(req.Data(), &q); err != nil || api.ValidateName(q.VM) != nil {
				_ = req.Error("400", `request must be {"vm":"<valid vm name>"}`, nil)
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			h, err := w.lookup(ctx, q.VM)
			if err != nil {
				_ = req.Error("404", err.Error(), nil)
				return
			}
			out, err := fn(ctx, h)
			if err != nil {
				code := "500"
				if errors.Is(err, backends.ErrNotFound) {
					code = "404"
				} else if errors.Is(err, backends.ErrNoAddress) || errors.Is(err, backends.ErrUnsupported) || errors.Is(err, backends.ErrNotRunning) {
					code = "409"
				}
				_ = req.Error(code, err.Error(), nil)
				return
			}
			_ = req.RespondJSON(out)
		})), micro.WithEndpointMetadata(map[string]string{"request": `{"vm":"<name>"}`}))
	}
	errs := errors.Join(
		add("state", func(ctx context.Context, h api.VmHandle) (any, error) {
			st, err := w.cfg.Router.State(ctx, h)
			if err != nil {
				return nil, err
			}
			return api.StateReply{VM: h.Name, Host: w.cfg.Host, State: st, Handle: h, Details: w.cfg.Router.Details(h)}, nil
		}),
		add("guest_ip", func(ctx context.Context, h api.VmHandle) (any, error) {
			ip, err := w.cfg.Router.GuestIP(ctx, h)
			if err != nil {
				return nil, err
			}
			r := api.GuestIPReply{VM: h.Name, IP: ip}
			if h.Spec == nil || h.Spec.Network == nil || h.Spec.Network.Type == api.NetworkUser {
				r.Port = w.cfg.Router.ForwardedSSH(h)
			}
			return r, nil
		}),
		add("console_endpoint", func(ctx context.Context, h api.VmHandle) (any, error) {
			return w.cfg.Router.ConsoleEndpoint(h)
		}),
		add("stats", func(ctx context.Context, h api.VmHandle) (any, error) {
			s, err := w.cfg.Router.Stats(ctx, h)
			if err != nil {
				return nil, err
			}
			return statsReply(w.cfg.Host, h, s), nil
		}),
	)
	// Consoles, logs and tunnels of this host's VMs, for vmctl anywhere.
	w.relay = &relay.Server{NC: w.cfg.NC, Names: w.cfg.Names, Host: w.cfg.Host, Log: w.log, Target: relayTarget{w}, Limits: w.cfg.RelayLimits,
		// The backends open their consoles and keep their history.
		Dial: w.cfg.Router.DialConsole, History: w.cfg.Router.ConsoleHistory}
	errs = errors.Join(errs, w.relay.AddEndpoints(svc))
	if errs != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("worker: adding query endpoints: %w", errs)
	}
	return svc, nil
}

// statsReply is the wire form of a backend's sample.
func statsReply(host string, h api.VmHandle, s backends.Stats) api.StatsReply {
	r := api.StatsReply{
		VM: h.Name, Host: host, Backend: h.Backend, State: s.State,
		Time: s.Time, StartedAt: s.StartedAt, CPUNS: s.CPUTime.Nanoseconds(),
		Vcpus: []api.VcpuStats{}, Disks: []api.DiskStats{},
		MemoryBytes: s.MemoryBytes, RSSBytes: s.RSSBytes,
		NetsUnavailable: s.NetsUnavailable, Simulated: s.Simulated,
	}
	if !s.StartedAt.IsZero() && s.Time.After(s.StartedAt) {
		r.UptimeMS = s.Time.Sub(s.StartedAt).Milliseconds()
	}
	for _, v := range s.Vcpus {
		r.Vcpus = append(r.Vcpus, api.VcpuStats{Index: v.Index, ThreadID: v.ThreadID, CPUNS: v.CPUTime.Nanoseconds()})
	}
	for _, d := range s.Disks {
		r.Disks = append(r.Disks, api.DiskStats{Device: d.Device, RdBytes: d.RdBytes, WrBytes: d.WrBytes, RdOps: d.RdOps, WrOps: d.WrOps})
	}
	for _, n := range s.Nets {
		r.Nets = append(r.Nets, api.NetStats{Name: n.Name, RxBytes: n.RxBytes, TxBytes: n.TxBytes, RxPackets: n.RxPackets, TxPackets: n.TxPackets})
	}
	return r
}

// lookup finds the handle of one of this host's VMs.
func (w *Worker) lookup(ctx context.Context, name string) (api.VmHandle, error) {
	w.mu.Lock()
	var h api.VmHandle
	l, ok := w.vms[name]
	if ok {
		h = l.handle.Clone() // under the lock: note replaces it
	}
	w.mu.Unlock()
	if ok {
		return h, nil
	}
	kv, err := w.cfg.JS.KeyValue(ctx, w.cfg.Names.RecordsBucket())
	if err != nil {
		return api.VmHandle{}, err
	}
	e, err := kv.Get(ctx, name)
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return api.VmHandle{}, fmt.Errorf("vm %s: no such vm", name)
		}
		return api.VmHandle{}, err
	}
	r, err := api.UnmarshalRecord(e.Value())
	if err != nil {
		return api.VmHandle{}, err
	}
	if r.Host != w.cfg.Host {
		return api.VmHandle{}, fmt.Errorf("vm %s is on host %s, not %s", name, r.Host, w.cfg.Host)
	}
	if r.Handle == nil {
		return api.VmHandle{}, fmt.Errorf("vm %s has no handle yet (state %s)", name, r.State)
	}
	return *r.Handle, nil
}

// relayTarget is what the relay (consoles, logs, tunnels) reaches on this
// host: the VMs the worker knows.
type relayTarget struct{ w *Worker }

func (t relayTarget) handle(ctx context.Context, name string) (api.VmHandle, error) {
	h, err := t.w.lookup(ctx, name)
	if err != nil {
		return h, &relay.StatusError{Code: "404", Err: err}
	}
	return h, nil
}

func (t relayTarget) ConsoleEndpoint(ctx context.Context, name string) (api.ConsoleEndpoint, error) {
	h, err := t.handle(ctx, name)
	if err != nil {
		return api.ConsoleEndpoint{}, err
	}
	ep, err := t.w.cfg.Router.ConsoleEndpoint(h)
	if err != nil {
		return ep, &relay.StatusError{Code: "409", Err: err}
	}
	return ep, nil
}

// GuestAddr: with user-mode networking the guest is reachable only
// through its forwarded SSH port; otherwise at its address. Only while
// the backend says the VM runs: a prepared, stopped or suspended VM's
// forwarded port is not its guest's (after a stop, whatever listens on
// that host port would be reached).
func (t relayTarget) GuestAddr(ctx context.Context, name string, port int) (string, error) {
	h, err := t.handle(ctx, name)
	if err != nil {
		return "", err
	}
	st, err := t.w.cfg.Router.State(ctx, h)
	if err != nil {
		code := "409"
		if errors.Is(err, backends.ErrNotFound) {
			code = "404"
		}
		return "", &relay.StatusError{Code: code, Err: fmt.Errorf("vm %s: %w", name, err)}
	}
	if st != api.StateRunning {
		return "", &relay.StatusError{Code: "409", Err: fmt.Errorf("vm %s is %s, not running: a tunnel reaches only a running VM's guest (start or resume it first)", name, st)}
	}
	if h.Spec == nil || h.Spec.Network == nil || h.Spec.Network.Type == api.NetworkUser {
		fwd := t.w.cfg.Router.ForwardedSSH(h)
		if fwd == 0 {
			return "", &relay.StatusError{Code: "409", Err: fmt.Errorf("vm %s has no forwarded port (user-mode networking on a backend without one)", name)}
		}
		if port != 22 {
			return "", &relay.StatusError{Code: "409", Err: fmt.Errorf("vm %s uses user-mode networking: only the guest's SSH port 22 is reachable from its host, not port %d", name, port)}
		}
		return net.JoinHostPort("127.0.0.1", strconv.Itoa(fwd)), nil
	}
	ip, err := t.w.cfg.Router.GuestIP(ctx, h)
	if err != nil {
		return "", &relay.StatusError{Code: "409", Err: fmt.Errorf("vm %s: %w", name, err)}
	}
	return net.JoinHostPort(ip, strconv.Itoa(port)), nil
}

package engine

import (
	"context"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/vmherd/vmherd/internal/hosts"
)

// runHostEvents turns the changes the host registry sees (a host lost,
// back, cordoned, uncordoned, forgotten) into host events on
// vm.host.<host>.<type> in the events stream, where `vmctl events` and any
// subscriber see them. Every engine sees every change; the event's message
// id (host, type and VM_HOSTS revision) stores it once, and an event the
// stream already holds for that revision is not written again, even after
// the duplicate window.
func (e *Engine) runHostEvents(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case c := <-e.hosts.Changes():
			e.hostEvent(ctx, c)
		}
	}
}

func (e *Engine) hostEvent(ctx context.Context, c hosts.Change) {
	subj := e.cfg.Names.HostEvent(c.Host, c.Kind)
	if m, err := e.store.Stream().GetLastMsgForSubject(ctx, subj); err == nil {
		if prev, err := api.DecodeHostEvent(m.Data); err == nil && prev.Rev == c.Rev {
			return
		}
	}
	ev := api.HostEvent{
		Type: c.Kind, Host: c.Host, Time: time.Now().UTC(), Rev: c.Rev,
		Reason: c.Reason, LastHeartbeat: c.Last.UTC(),
	}
	if c.Kind == api.HostLost {
		ev.VMs = e.placed.vmsOn(c.Host)
	}
	for attempt := 0; attempt < 10 && ctx.Err() == nil; attempt++ {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, _, err := e.store.AppendHost(pctx, &ev, api.HostEventMsgID(c.Host, c.Kind, c.Rev))
		cancel()
		if err == nil {
			e.log.Info("host event", "host", c.Host, "type", c.Kind, "reason", c.Reason, "vms", len(ev.VMs))
			return
		}
		e.log.Warn("storing host event failed; retrying", "host", c.Host, "type", c.Kind, "err", err)
		time.Sleep(time.Duration(attempt+1) * 250 * time.Millisecond)
	}
}

// runHostConsumers creates each known host's task consumer, and updates it
// when the host's worker asks for other settings in its heartbeat. Workers
// only pull from their host's consumer: one that could create consumers
// could read any host's tasks.
func (e *Engine) runHostConsumers(ctx context.Context) error {
	made := map[string]api.TaskSettings{}
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		for _, h := range e.hosts.List() {
			if s, ok := made[h.Host]; ok && s == h.Tasks {
				continue
			}
			cfg := jsetup.HostTaskConsumerConfig(e.cfg.Names, h.Host, h.Tasks.AckWait(), h.Tasks.Pending())
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := e.cfg.JS.CreateOrUpdateConsumer(cctx, e.cfg.Names.TasksStream(), cfg)
			cancel()
			if err != nil {
				if ctx.Err() == nil {
					e.log.Warn("creating a host's task consumer failed; retrying", "host", h.Host, "err", err)
				}
				continue
			}
			made[h.Host] = h.Tasks
			e.log.Debug("host task consumer ready", "host", h.Host, "ack_wait", cfg.AckWait, "max_ack_pending", cfg.MaxAckPending)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

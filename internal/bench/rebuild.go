package bench

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/projection"
)

// Rebuild is figure 3.
type Rebuild struct {
	Events       int     `json:"events"`
	VMs          int     `json:"vms"`
	StreamBytes  uint64  `json:"stream_bytes"`
	WriteSeconds float64 `json:"write_seconds"`
	WritePerS    float64 `json:"write_events_per_s"`
	// The raw replay runs before and after the others; RawPerS is the mean.
	RawSeconds float64 `json:"raw_replay_seconds"`
	RawPerS    float64 `json:"raw_replay_events_per_s"`
	RawBeforeS float64 `json:"raw_replay_before_events_per_s"`
	RawAfterS  float64 `json:"raw_replay_after_events_per_s"`
	// Replay folds the stream into records in memory (projection.Replay).
	ReplaySeconds float64 `json:"replay_seconds"`
	ReplayPerS    float64 `json:"replay_events_per_s"`
	// Rebuild is Replay plus dropping and writing VM_RECORDS (engine rebuild).
	RebuildSeconds float64 `json:"rebuild_seconds"`
	RebuildPerS    float64 `json:"rebuild_events_per_s"`
	// The same two passes with encoding/json decoding every event instead
	// of events' decodeFast (events.UseStdlibDecoder).
	ReplayStdSeconds  float64 `json:"replay_stdlib_seconds"`
	ReplayStdPerS     float64 `json:"replay_stdlib_events_per_s"`
	RebuildStdSeconds float64 `json:"rebuild_stdlib_seconds"`
	RebuildStdPerS    float64 `json:"rebuild_stdlib_events_per_s"`
	RatioStd          float64 `json:"ratio_rebuild_stdlib_to_raw"`
	RatioReplayStd    float64 `json:"ratio_replay_stdlib_to_raw"`
	Records           int     `json:"records"`
	Ratio             float64 `json:"ratio_rebuild_to_raw"`
	RatioReplay       float64 `json:"ratio_replay_to_raw"`
	Checked           bool    `json:"records_checked"`
}

// stepsPerVM are the events each VM gets: five commands, each accepted
// and answered (prepare, start, suspend, resume, stop).
var rebuildSteps = []struct {
	action fsm.Action
	result api.EventType
	state  api.VmState
}{
	{"prepare", api.TypePrepared, api.StatePrepared},
	{"start", api.TypeStarted, api.StateRunning},
	{"suspend", api.TypeSuspended, api.StateSuspended},
	{"resume", api.TypeResumed, api.StateRunning},
	{"stop", api.TypeStopped, api.StateStopped},
}

// writeEvents fills VM_EVENTS with what the pipeline would have written
// for vms VMs going through rebuildSteps, with async publishes, VMs
// interleaved in groups of 1000 as concurrent users would interleave them.
func writeEvents(ctx context.Context, js jetstream.JetStream, vms int) (int, error) {
	names := api.DefaultNames
	now := time.Now().UTC()
	n := 0
	const group = 1000
	publish := func(ev *api.Event) error {
		writer := api.EngineWriter
		if ev.Type != api.TypeAccepted && ev.Type != api.TypeRejected {
			writer = ev.Host // results come from the VM's host's worker
		}
		if _, err := js.PublishAsync(names.Event(ev.VM, ev.Type, writer), ev.Encode()); err != nil {
			return err
		}
		n++
		if n%4000 == 0 {
			select {
			case <-js.PublishAsyncComplete():
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(60 * time.Second):
				return fmt.Errorf("acks did not arrive within 60s")
			}
		}
		return nil
	}
	handles := make([]*api.VmHandle, group)
	for g := 0; g < vms; g += group {
		for si, s := range rebuildSteps {
			for i := g; i < min(g+group, vms); i++ {
				name := fmt.Sprintf("rb-%06d", i)
				cmdID := name + "-" + strconv.Itoa(si)
				next, _ := fsm.Decide(fsm.StateAbsent, fsm.ActPrepare)
				if si > 0 {
					cur := rebuildSteps[si-1].state
					next, _ = fsm.Decide(cur, s.action)
				}
				acc := &api.Event{Type: api.TypeAccepted, VM: name, CommandID: cmdID, Action: s.action,
					Time: now, Host: benchHost, State: next, Backend: api.BackendNoop, Handle: handles[i-g]}
				if s.action == "prepare" {
					spec := api.VmSpec{Name: name, Backend: api.BackendNoop, Vcpus: 1, MemoryMB: 128}.WithDefaults()
					acc.Spec = &spec
					acc.Handle = nil
				}
				if err := publish(acc); err != nil {
					return n, err
				}
				h := handles[i-g]
				if s.action == "prepare" {
					h = &api.VmHandle{ID: fmt.Sprintf("%016x", i), Name: name, Backend: api.BackendNoop, Host: benchHost, Spec: acc.Spec}
				} else {
					c := h.Clone()
					h = &c
				}
				switch s.action {
				case "start":
					h.PID, h.StartedAt = 1000+i, now
				case "stop":
					h.PID = 0
				}
				handles[i-g] = h
				res := &api.Event{Type: s.result, VM: name, CommandID: cmdID, Action: s.action,
					Time: now, Host: benchHost, State: s.state, Handle: h, AcceptedSeq: uint64(n)}
				if err := publish(res); err != nil {
					return n, err
				}
			}
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(60 * time.Second):
		return n, fmt.Errorf("acks did not arrive within 60s")
	}
	return n, nil
}

// rawReplay reads the whole stream with an ordered consumer, as Replay
// does, without decoding or folding anything.
func rawReplay(ctx context.Context, js jetstream.JetStream) (int, error) {
	st, err := js.Stream(ctx, api.DefaultNames.EventsStream())
	if err != nil {
		return 0, err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return 0, err
	}
	last := info.State.LastSeq
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return 0, err
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(4096))
	if err != nil {
		return 0, err
	}
	defer it.Stop()
	n := 0
	for {
		m, err := it.Next()
		if err != nil {
			return n, err
		}
		md, err := m.Metadata()
		if err != nil {
			return n, err
		}
		n++
		if md.Sequence.Stream >= last {
			return n, nil
		}
	}
}

// rebuild measures figure 3 on its own server.
func rebuild(ctx context.Context, srv *server, vms int) (Rebuild, error) {
	nc, js, err := connect(srv.url, "bench-rebuild")
	if err != nil {
		return Rebuild{}, err
	}
	defer nc.Close()
	if err := jsetup.Ensure(ctx, js, api.DefaultNames, jsetup.DefaultSettings); err != nil {
		return Rebuild{}, err
	}
	r := Rebuild{VMs: vms}
	t0 := time.Now()
	if r.Events, err = writeEvents(ctx, js, vms); err != nil {
		return r, fmt.Errorf("writing events: %w", err)
	}
	r.WriteSeconds = time.Since(t0).Seconds()
	r.WritePerS = float64(r.Events) / r.WriteSeconds
	st, err := js.Stream(ctx, api.DefaultNames.EventsStream())
	if err != nil {
		return r, err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return r, err
	}
	r.StreamBytes = info.State.Bytes
	if int(info.State.Msgs) != r.Events {
		return r, fmt.Errorf("stream holds %d events, %d were written", info.State.Msgs, r.Events)
	}

	raw := func() (float64, float64, error) {
		t0 := time.Now()
		n, err := rawReplay(ctx, js)
		if err != nil {
			return 0, 0, fmt.Errorf("raw replay: %w", err)
		}
		secs := time.Since(t0).Seconds()
		return secs, float64(n) / secs, nil
	}
	var rawSecs float64
	if rawSecs, r.RawBeforeS, err = raw(); err != nil {
		return r, err
	}

	if r.ReplaySeconds, r.ReplayPerS, r.RebuildSeconds, r.RebuildPerS, r.Records, err = replayAndRebuild(ctx, js, vms); err != nil {
		return r, err
	}
	recN := r.Records
	// Both again with encoding/json alone: is decodeFast needed?
	events.UseStdlibDecoder(true)
	var stdN int
	r.ReplayStdSeconds, r.ReplayStdPerS, r.RebuildStdSeconds, r.RebuildStdPerS, stdN, err = replayAndRebuild(ctx, js, vms)
	events.UseStdlibDecoder(false)
	if err != nil {
		return r, fmt.Errorf("with encoding/json: %w", err)
	}
	if stdN != vms {
		return r, fmt.Errorf("rebuild with encoding/json made %d records, want %d", stdN, vms)
	}
	var rawSecs2 float64
	if rawSecs2, r.RawAfterS, err = raw(); err != nil {
		return r, err
	}
	r.RawSeconds = (rawSecs + rawSecs2) / 2
	r.RawPerS = (r.RawBeforeS + r.RawAfterS) / 2
	r.Ratio = ratio(r.RebuildPerS, r.RawPerS)
	r.RatioReplay = ratio(r.ReplayPerS, r.RawPerS)
	r.RatioStd = ratio(r.RebuildStdPerS, r.RawPerS)
	r.RatioReplayStd = ratio(r.ReplayStdPerS, r.RawPerS)
	if recN != vms {
		return r, fmt.Errorf("rebuilt %d records, want %d", recN, vms)
	}
	kv, err := js.KeyValue(ctx, api.DefaultNames.RecordsBucket())
	if err != nil {
		return r, err
	}
	kst, err := kv.Status(ctx)
	if err != nil {
		return r, err
	}
	if int(kst.Values()) != vms {
		return r, fmt.Errorf("VM_RECORDS holds %d records after rebuild, want %d", kst.Values(), vms)
	}
	r.Checked = true
	return r, nil
}

// replayAndRebuild times projection.Replay, checking that its records are
// what the events say, then projection.Rebuild; it returns the seconds
// and events per second of each and the records the rebuild wrote.
func replayAndRebuild(ctx context.Context, js jetstream.JetStream, vms int) (replayS, replayPerS, rebuildS, rebuildPerS float64, records int, err error) {
	t0 := time.Now()
	recs, n, err := projection.Replay(ctx, js, api.DefaultNames)
	if err != nil {
		return 0, 0, 0, 0, 0, err
	}
	replayS = time.Since(t0).Seconds()
	replayPerS = float64(n) / replayS
	// The records must be what the events say.
	if len(recs) != vms {
		return 0, 0, 0, 0, 0, fmt.Errorf("replay made %d records, want %d", len(recs), vms)
	}
	for _, rec := range recs {
		if rec.State != api.StateStopped || len(rec.InFlight) != 0 || rec.Generation != 1 {
			return 0, 0, 0, 0, 0, fmt.Errorf("record %s after replay: state %s, %d in flight, generation %d; want stopped, 0, 1",
				rec.Name, rec.State, len(rec.InFlight), rec.Generation)
		}
	}
	recs = nil
	runtime.GC() // the rebuild should not pay for the replay's records

	t0 = time.Now()
	records, n, err = projection.Rebuild(ctx, js, api.DefaultNames, jsetup.DefaultSettings)
	if err != nil {
		return 0, 0, 0, 0, 0, err
	}
	rebuildS = time.Since(t0).Seconds()
	return replayS, replayPerS, rebuildS, float64(n) / rebuildS, records, nil
}

package testenv

import (
	"context"
	"fmt"
	"reflect"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/projection"
)

// Counts summarise what the streams hold.
type Counts struct {
	Events     int
	Accepted   int
	Rejected   int
	Results    int
	Exited     int
	Cancels    int // accepted cancels of a migration (each answered by its migrate's failed result)
	Duplicates int // a second decision or result for one command
	Lost       int // accepted commands without a result
	// LostCommands names each lost command: "<vm> <command id> <action> <accepted seq>".
	LostCommands []string
}

func (c Counts) String() string {
	return fmt.Sprintf("events=%d accepted=%d rejected=%d results=%d exited=%d duplicates=%d lost=%d",
		c.Events, c.Accepted, c.Rejected, c.Results, c.Exited, c.Duplicates, c.Lost)
}

// CheckStreams checks the invariants of docs/architecture.md from the streams alone:
// every accepted command has exactly one result, no command is decided
// twice, every accepted event is a transition the FSM table allows from the
// state the VM's earlier events fold to, and every event matches its schema.
func (e *Env) CheckStreams() Counts {
	e.T.Helper()
	var c Counts
	all := e.AllEvents()
	c.Events = len(all)
	type cmdState struct{ decisions, results int }
	perVM := map[string]map[string]*cmdState{}
	recs := map[string]*api.VmRecord{}
	for _, s := range all {
		ev := s.Event
		if ev == nil {
			e.T.Errorf("undecodable event at seq %d", s.Seq)
			continue
		}
		cmds := perVM[ev.VM]
		if cmds == nil {
			cmds = map[string]*cmdState{}
			perVM[ev.VM] = cmds
		}
		cs := cmds[ev.CommandID]
		if cs == nil && ev.CommandID != "" {
			cs = &cmdState{}
			cmds[ev.CommandID] = cs
		}
		rec := recs[ev.VM]
		switch {
		case ev.Type == api.TypeAccepted && ev.Cancel:
			// A cancel of a migration: decided once, answered by the
			// failed result of the migrate it abandons.
			c.Accepted++
			c.Cancels++
			cs.decisions++
			cs.results++
			if rec.CurrentState() != api.StateMigrating || rec.Migration == nil {
				e.T.Errorf("seq %d: vm %s: accepted a cancel in state %s, with no migration in flight", s.Seq, ev.VM, rec.CurrentState())
			} else if ev.State != rec.Migration.Before {
				e.T.Errorf("seq %d: vm %s: a cancel says state %s, the migrate began in %s", s.Seq, ev.VM, ev.State, rec.Migration.Before)
			}
		case ev.Type == api.TypeAccepted:
			c.Accepted++
			cs.decisions++
			a, err := api.ParseAction(string(ev.Action))
			if err != nil {
				e.T.Errorf("seq %d: accepted unknown action %q", s.Seq, ev.Action)
				break
			}
			if a == fsm.ActPurge {
				// A purge is the first event left of its VM (the engine
				// removed the ones before it), or follows a destroyed
				// record; it says destroyed, the state it was purged from.
				if (rec != nil && rec.CurrentState() != api.StateDestroyed) || ev.State != api.StateDestroyed {
					e.T.Errorf("seq %d: vm %s: accepted purge (state %s) from %s", s.Seq, ev.VM, ev.State, rec.CurrentState())
				}
				break
			}
			want, err := fsm.Decide(rec.CurrentState(), a)
			if err != nil {
				e.T.Errorf("seq %d: vm %s: accepted %s from %s, which the FSM forbids: %v", s.Seq, ev.VM, ev.Action, rec.CurrentState(), err)
			} else if ev.State != want {
				e.T.Errorf("seq %d: vm %s: accepted %s says state %s, FSM says %s", s.Seq, ev.VM, ev.Action, ev.State, want)
			}
		case ev.Type == api.TypeRejected:
			c.Rejected++
			if cs != nil {
				cs.decisions++
			}
		case ev.Type == api.TypeExited:
			c.Exited++
		case ev.Type.IsResult():
			c.Results++
			cs.results++
		}
		if cs != nil && (cs.decisions > 1 || cs.results > 1) {
			c.Duplicates++
			e.T.Errorf("seq %d: vm %s command %s decided %d times, %d results", s.Seq, ev.VM, ev.CommandID, cs.decisions, cs.results)
		}
		if ev.VM != "_invalid" {
			recs[ev.VM] = projection.Fold(rec, ev, s.Seq)
		}
	}
	for vmName, cmds := range perVM {
		for id, cs := range cmds {
			if cs.results > 0 && cs.decisions == 0 {
				e.T.Errorf("vm %s command %s has a result but no decision", vmName, id)
			}
		}
	}
	for vmName, r := range recs {
		// Accepted commands still in flight are lost if nothing is running them.
		c.Lost += len(r.InFlight)
		for _, f := range r.InFlight {
			c.LostCommands = append(c.LostCommands, fmt.Sprintf("%s %s %s %d", vmName, f.CommandID, f.Action, f.Seq))
		}
	}
	return c
}

// CheckProjection waits until the live records equal a rebuild from the
// event stream (the projection catches up asynchronously).
func (e *Env) CheckProjection(timeout time.Duration) {
	e.T.Helper()
	ctx := context.Background()
	var diff string
	e.WaitFor("VM_RECORDS to equal a rebuild from VM_EVENTS", timeout, func() bool {
		want, _, err := projection.Replay(ctx, e.JS, e.Names)
		if err != nil {
			diff = err.Error()
			return false
		}
		got, err := projection.Load(ctx, e.JS, e.Names)
		if err != nil {
			diff = err.Error()
			return false
		}
		diff = recordsDiff(want, got)
		return diff == ""
	})
	if diff != "" {
		e.T.Fatal(diff)
	}
}

func recordsDiff(want, got map[string]*api.VmRecord) string {
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			return fmt.Sprintf("record %s missing from VM_RECORDS", k)
		}
		if !reflect.DeepEqual(normalize(w), normalize(g)) {
			return fmt.Sprintf("record %s differs:\nrebuilt %s\nlive    %s", k, w.Marshal(), g.Marshal())
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			return fmt.Sprintf("record %s in VM_RECORDS but not in a rebuild", k)
		}
	}
	return ""
}

// normalize round-trips through JSON so time zones and nil/empty compare equal.
func normalize(r *api.VmRecord) *api.VmRecord {
	out, _ := api.UnmarshalRecord(r.Marshal())
	return out
}

// ConsumerCounts returns the number of consumers on every stream of the
// server (the KV buckets' streams included), by stream name.
func (e *Env) ConsumerCounts() map[string]int {
	e.T.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out := map[string]int{}
	l := e.JS.ListStreams(ctx)
	for info := range l.Info() {
		out[info.Config.Name] = info.State.Consumers
	}
	if err := l.Err(); err != nil {
		e.T.Fatalf("listing streams: %v", err)
	}
	return out
}

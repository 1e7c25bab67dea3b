package engine

import (
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
)

// Which records the retention purges: destroyed, nothing in flight, last
// event at least keep ago.
func TestRetired(t *testing.T) {
	now := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	keep := time.Hour
	for _, c := range []struct {
		name string
		rec  *api.VmRecord
		want bool
	}{
		{"destroyed long ago", &api.VmRecord{State: api.StateDestroyed, UpdatedAt: now.Add(-2 * time.Hour)}, true},
		{"destroyed exactly keep ago", &api.VmRecord{State: api.StateDestroyed, UpdatedAt: now.Add(-keep)}, true},
		{"destroyed recently", &api.VmRecord{State: api.StateDestroyed, UpdatedAt: now.Add(-time.Minute)}, false},
		{"destroyed, no time", &api.VmRecord{State: api.StateDestroyed}, false},
		{"destroyed, a prepare in flight", &api.VmRecord{State: api.StateDestroyed, UpdatedAt: now.Add(-2 * time.Hour),
			InFlight: []api.InFlight{{CommandID: "p", Action: fsm.ActPrepare}}}, false},
		{"stopped long ago", &api.VmRecord{State: api.StateStopped, UpdatedAt: now.Add(-48 * time.Hour)}, false},
		{"failed long ago", &api.VmRecord{State: api.StateFailed, UpdatedAt: now.Add(-48 * time.Hour)}, false},
		{"absent", &api.VmRecord{State: fsm.StateAbsent, UpdatedAt: now.Add(-48 * time.Hour)}, false},
		{"nil", nil, false},
	} {
		if got := retired(c.rec, now, keep); got != c.want {
			t.Errorf("%s: retired = %v, want %v", c.name, got, c.want)
		}
	}
}

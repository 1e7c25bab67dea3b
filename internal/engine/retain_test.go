package engine

import (
	"testing"
	"time"

	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/vm"
)

// Which records the retention purges: destroyed, nothing in flight, last
// event at least keep ago.
func TestRetired(t *testing.T) {
	now := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	keep := time.Hour
	for _, c := range []struct {
		name string
		rec  *projection.VmRecord
		want bool
	}{
		{"destroyed long ago", &projection.VmRecord{State: vm.StateDestroyed, UpdatedAt: now.Add(-2 * time.Hour)}, true},
		{"destroyed exactly keep ago", &projection.VmRecord{State: vm.StateDestroyed, UpdatedAt: now.Add(-keep)}, true},
		{"destroyed recently", &projection.VmRecord{State: vm.StateDestroyed, UpdatedAt: now.Add(-time.Minute)}, false},
		{"destroyed, no time", &projection.VmRecord{State: vm.StateDestroyed}, false},
		{"destroyed, a prepare in flight", &projection.VmRecord{State: vm.StateDestroyed, UpdatedAt: now.Add(-2 * time.Hour),
			InFlight: []projection.InFlight{{CommandID: "p", Action: fsm.ActPrepare}}}, false},
		{"stopped long ago", &projection.VmRecord{State: vm.StateStopped, UpdatedAt: now.Add(-48 * time.Hour)}, false},
		{"failed long ago", &projection.VmRecord{State: vm.StateFailed, UpdatedAt: now.Add(-48 * time.Hour)}, false},
		{"absent", &projection.VmRecord{State: fsm.StateAbsent, UpdatedAt: now.Add(-48 * time.Hour)}, false},
		{"nil", nil, false},
	} {
		if got := retired(c.rec, now, keep); got != c.want {
			t.Errorf("%s: retired = %v, want %v", c.name, got, c.want)
		}
	}
}

package engine

import (
	"strings"
	"time"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/hosts"
	"github.com/vmherd/vmherd/internal/projection"
	"github.com/vmherd/vmherd/internal/vm"
)

// hostView is what admission needs to know of the hosts: the engine's
// hosts.Registry (fed by the VM_HOSTS bucket), or a table in tests.
type hostView interface {
	Get(host string) (*hosts.Heartbeat, bool)
	Place(b vm.BackendTag) (*hosts.Heartbeat, error)
	Alive() []*hosts.Heartbeat
}

// admission is the decision proper, apart from NATS: given a VM's record
// and the hosts, it accepts or rejects a command. It does no I/O of its
// own (the registry may re-read a host it believes lost).
type admission struct {
	hosts     hostView
	lostAfter time.Duration
}

// admit decides a parsed command on the VM's record: the state machine,
// placement (prepare), the host's liveness and its backend's
// capabilities. On accept it fills ev; else it returns the reason.
func (a admission) admit(rec *projection.VmRecord, act fsm.Action, cmd *events.Command, ev *events.Event) error {
	cur := rec.CurrentState()
	host, backend := rec.Host, rec.Backend
	if act == fsm.ActPrepare {
		spec := cmd.Spec.WithDefaults()
		if spec.Name == "" {
			spec.Name = ev.VM
		}
		if spec.Name != ev.VM {
			return reject("spec.name: %q must match the vm in the subject (%q)", spec.Name, ev.VM)
		}
		if _, err := fsm.Decide(cur, act); err != nil {
			return err
		}
		hb, err := a.place(cmd.Host, spec.Backend)
		if err != nil {
			return err
		}
		if spec.Backend == "" {
			spec.Backend = hb.DefaultBackend
		}
		spec = spec.WithDefaults() // the network default depends on the backend
		if err := spec.Validate(); err != nil {
			return err
		}
		host, backend = hb.Host, spec.Backend
		ev.Spec = &spec
	} else if rec.Exists() && cur != vm.StateDestroyed {
		if _, err := fsm.Decide(cur, act); err != nil {
			return err
		}
		hb, alive := a.hosts.Get(host)
		if !alive {
			return reject("host %s of vm %s is lost (no heartbeat for over %s); %s is rejected until its worker is back", host, ev.VM, a.lostAfter, act)
		}
		if !hb.Can(backend, act) {
			return reject("backend %s cannot %s (not supported by the backend on host %s)", backend, act, host)
		}
	}
	next, err := fsm.Decide(cur, act)
	if err != nil {
		return err
	}
	ev.Type = events.TypeAccepted
	ev.State = next
	ev.Host = host
	ev.Backend = backend
	ev.Handle = rec.Handle
	if cmd.TimeoutS > 0 {
		ev.TimeoutS = cmd.TimeoutS
	}
	return nil
}

func (a admission) place(pin string, b vm.BackendTag) (*hosts.Heartbeat, error) {
	if pin != "" {
		hb, alive := a.hosts.Get(pin)
		if hb == nil {
			return nil, reject("host: %q is not a known host (alive hosts: %s)", pin, a.aliveList())
		}
		if !alive {
			return nil, reject("host: %q is not alive (no heartbeat for over %s)", pin, a.lostAfter)
		}
		if b != "" && !hb.Has(b) {
			return nil, reject("host: %q has no %s backend (it has %v)", pin, b, hb.Backends)
		}
		return hb, nil
	}
	hb, err := a.hosts.Place(b)
	if err != nil {
		return nil, reject("placement: %v", err)
	}
	return hb, nil
}

func (a admission) aliveList() string {
	var names []string
	for _, hb := range a.hosts.Alive() {
		names = append(names, hb.Host)
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

package engine

import (
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/hosts"
)

// hostView is what admission needs to know of the hosts: the engine's
// hosts.Registry (fed by the VM_HOSTS bucket), or a table in tests.
type hostView interface {
	Get(host string) *api.Host
	List() []*api.Host
}

// admission is the decision proper, apart from NATS: given a VM's record
// and the hosts, it accepts or rejects a command. It does no I/O: the
// registry answers from memory (hosts.Registry.Get).
type admission struct {
	hosts     hostView
	lostAfter time.Duration
	// placed is what the VMs placed on a host take (the engine's count
	// from the records); nil counts nothing.
	placed func(host string) api.Resources
	// quotas and count: how many VMs a host or a name prefix may have,
	// and how many it has (nil: no quotas).
	quotas Quotas
	count  vmCounter
	// hasImage tells whether a host has an image ready in its store
	// (VM_IMAGES); nil: no host has any.
	hasImage func(host, name string) bool
	// book serialises placements and counts each until it is folded
	// (nil: placements are not counted before their fold).
	book booking
	// maxTimeout is the largest timeout_s a command may ask for
	// (--max-command-timeout); 0: DefaultMaxCommandTimeout.
	maxTimeout time.Duration
}

// booking is what placement needs to see placements decided at the same
// moment (the engine's placedCount): prepares choose their hosts one
// after the other, each counted from its choice on.
type booking interface {
	lockPlacing()
	unlockPlacing()
	reserve(name, host string, b api.BackendTag, res api.Resources, after uint64)
}

// DefaultMaxCommandTimeout is the largest timeout_s the engines accept
// unless --max-command-timeout says otherwise: a stop's grace (or any
// call's bound) holds the VM and one of its worker's call slots for that
// long, so the schema's 24 hours let one operator pin a host's workers.
const DefaultMaxCommandTimeout = 15 * time.Minute

// SetMaxCommandTimeout sets the largest timeout_s this engine accepts (0:
// DefaultMaxCommandTimeout; at most the schema's 86400 s). Call it before
// Run.
func (e *Engine) SetMaxCommandTimeout(d time.Duration) { e.adm.maxTimeout = d }

// checkTimeout rejects a timeout_s over the engine's limit.
func (a admission) checkTimeout(cmd *api.Command) error {
	max := a.maxTimeout
	if max <= 0 {
		max = DefaultMaxCommandTimeout
	}
	if cmd.TimeoutS > 0 && time.Duration(cmd.TimeoutS)*time.Second > max {
		return reject("timeout_s: %d s is over the %d s this engine allows (--max-command-timeout %s); ask for at most %d",
			cmd.TimeoutS, int(max/time.Second), max, int(max/time.Second))
	}
	return nil
}

// vmCounter counts the VMs (not destroyed) the records have.
type vmCounter interface {
	onHost(host string) int
	withPrefix(prefix string) int
}

// Quotas limit VMs that are not destroyed: at most PerHost on one host
// (0: no limit), and at most Prefix[p] whose names start with p.
type Quotas struct {
	PerHost int
	Prefix  map[string]int
}

// checkQuota rejects a prepare of name on host that would exceed a quota.
func (a admission) checkQuota(name, host string) error {
	if a.count == nil {
		return nil
	}
	if a.quotas.PerHost > 0 && a.count.onHost(host) >= a.quotas.PerHost {
		return reject("quota: host %s has %d VMs, the most a host may have (--max-vms-per-host %d)", host, a.count.onHost(host), a.quotas.PerHost)
	}
	for p, max := range a.quotas.Prefix {
		if strings.HasPrefix(name, p) {
			if n := a.count.withPrefix(p); n >= max {
				return reject("quota: %d VMs named %s* exist, the most allowed (--quota %s=%d)", n, p, p, max)
			}
		}
	}
	return nil
}

// admit decides a parsed command on the VM's record: the state machine,
// placement (prepare), the host's liveness and its backend's
// capabilities. On accept it fills ev; else it returns the reason.
func (a admission) admit(rec *api.VmRecord, act fsm.Action, cmd *api.Command, ev *api.Event) error {
	if err := a.checkTimeout(cmd); err != nil {
		return err
	}
	cur := rec.CurrentState()
	host, backend := rec.Host, rec.Backend
	decide := func(cur api.VmState) (api.VmState, error) { return fsm.Decide(cur, act) }
	switch {
	case cmd.Forget:
		if !rec.Exists() {
			return reject("forget: there is no vm %s to forget", ev.VM)
		}
		if cur == api.StateDestroyed {
			return reject("forget: vm %s is already destroyed", ev.VM)
		}
		if h := a.hosts.Get(host); h != nil && h.Alive {
			return reject("forget: host %s of vm %s is alive; destroy it without forget (forget is for a host that will not come back)", host, ev.VM)
		}
		decide = fsm.Forget
		ev.Forget = true
		for _, f := range rec.InFlight {
			ev.Abandoned = append(ev.Abandoned, api.Abandoned{CommandID: f.CommandID, Action: f.Action, Seq: f.Seq})
		}
	case act == fsm.ActMigrate && cmd.Cancel:
		return a.admitCancel(rec, ev)
	case act == fsm.ActPurge:
		return admitPurge(rec, ev)
	case act == fsm.ActMigrate:
		if err := a.admitMigrate(rec, cmd, ev); err != nil {
			return err
		}
		decide = func(api.VmState) (api.VmState, error) { return api.StateMigrating, nil }
	case act == fsm.ActPrepare:
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
		if a.book != nil {
			a.book.lockPlacing()
			defer a.book.unlockPlacing()
		}
		h, err := a.place(cmd.Host, spec)
		if err != nil {
			return err
		}
		if err := a.checkQuota(ev.VM, h.Host); err != nil {
			return err
		}
		if spec.Backend == "" {
			spec.Backend = h.DefaultBackend
		}
		spec = spec.WithDefaults() // the network default depends on the backend
		if err := spec.Validate(); err != nil {
			return err
		}
		host, backend = h.Host, spec.Backend
		ev.Spec = &spec
		if a.book != nil {
			a.book.reserve(ev.VM, host, backend, api.Resources{Vcpus: spec.Vcpus, MemoryMB: spec.MemoryMB}, rec.LastSeq)
		}
	case rec.Live():
		if _, err := fsm.Decide(cur, act); err != nil {
			return err
		}
		h := a.hosts.Get(host)
		if h == nil || !h.Alive {
			hint := ""
			if act == fsm.ActDestroy {
				hint = " (if it will not come back: vmctl destroy --forget " + ev.VM + ")"
			}
			return reject("host %s of vm %s is lost (no heartbeat for over %s); %s is rejected until its worker is back%s", host, ev.VM, a.lostAfter, act, hint)
		}
		if !h.Can(backend, act) {
			return reject("backend %s cannot %s (not supported by the backend on host %s)", backend, act, host)
		}
	}
	next, err := decide(cur)
	if err != nil {
		return err
	}
	ev.Type = api.TypeAccepted
	ev.State = next
	ev.Host = host
	ev.Backend = backend
	ev.Handle = rec.Handle
	if cmd.TimeoutS > 0 {
		ev.TimeoutS = cmd.TimeoutS
	}
	return nil
}

// admitPurge decides a purge: only a destroyed VM with nothing in
// flight. Who may ask is the issuer rules' business, as for every command
// (an operator may command any VM; the decision records its issuer). The
// accepted event keeps the VM's last host and backend and says destroyed,
// the state it is purged from; its fold leaves the name absent
// (fsm.Decide).
func admitPurge(rec *api.VmRecord, ev *api.Event) error {
	cur := rec.CurrentState()
	if _, err := fsm.Decide(cur, fsm.ActPurge); err != nil {
		return err
	}
	if len(rec.InFlight) > 0 {
		return reject("cannot purge: vm %s has a command in flight (%s %s); purge it once that has ended", ev.VM, rec.InFlight[0].Action, rec.InFlight[0].CommandID)
	}
	ev.Type = api.TypeAccepted
	ev.State = api.StateDestroyed
	ev.Host = rec.Host
	ev.Backend = rec.Backend
	return nil
}

// admitMigrate decides a migrate: the state machine, the source host
// alive and its backend able to migrate, and a destination (the one
// asked for, or placed by prepare's rules among the others) that can
// take it. On accept it fills ev.Migration.
func (a admission) admitMigrate(rec *api.VmRecord, cmd *api.Command, ev *api.Event) error {
	cur := rec.CurrentState()
	if !rec.Live() {
		_, err := fsm.Decide(fsm.StateAbsent, fsm.ActMigrate)
		return err
	}
	if _, err := fsm.Decide(cur, fsm.ActMigrate); err != nil {
		return err
	}
	src := a.hosts.Get(rec.Host)
	if src == nil || !src.Alive {
		return reject("host %s of vm %s is lost (no heartbeat for over %s); a migrate needs its worker", rec.Host, ev.VM, a.lostAfter)
	}
	if !src.Can(rec.Backend, fsm.ActMigrate) {
		return reject("backend %s cannot migrate (not supported by the backend on host %s)", rec.Backend, rec.Host)
	}
	if rec.Handle == nil || rec.Handle.Spec == nil {
		return reject("vm %s has no handle with its spec yet; a migrate needs its prepare's result", ev.VM)
	}
	spec := *rec.Handle.Spec
	if spec.UEFI {
		return reject("vm %s boots with UEFI: its variable store is not migrated (not supported yet)", ev.VM)
	}
	if cmd.Host == rec.Host {
		return reject("host: vm %s is already on host %s", ev.VM, rec.Host)
	}
	spec.Backend = rec.Backend
	if rec.Image != "" {
		// Named: the destination must have it ready, and finds its own file.
		spec.Image, spec.ImagePath = rec.Image, ""
	}
	if a.book != nil {
		a.book.lockPlacing()
		defer a.book.unlockPlacing()
	}
	dst, err := a.placeAway(rec.Host, cmd.Host, spec)
	if err != nil {
		return err
	}
	if !dst.Can(rec.Backend, fsm.ActMigrate) {
		return reject("host: %s cannot take it: backend %s there cannot migrate", dst.Host, rec.Backend)
	}
	mode := api.MigrateCold
	if fsm.Live(cur) {
		mode = api.MigrateLive
	}
	ev.Migration = &api.Migration{From: rec.Host, To: dst.Host, Mode: mode, Before: cur}
	ev.Spec = &spec // what the destination's copy is made from
	return nil
}

// admitCancel decides the cancel of a migration in flight: the VM stays
// where it is, in the state it had; the migrate is abandoned (the engine
// stores its failed result) and both hosts' workers undo their part.
func (a admission) admitCancel(rec *api.VmRecord, ev *api.Event) error {
	if rec.CurrentState() != api.StateMigrating || rec.Migration == nil || len(rec.InFlight) == 0 {
		return reject("cancel: vm %s has no migration in flight (it is %s)", ev.VM, rec.CurrentState())
	}
	m := rec.InFlight[len(rec.InFlight)-1]
	ev.Type = api.TypeAccepted
	ev.Cancel = true
	ev.State = rec.Migration.Before
	ev.Host = rec.Host
	ev.Backend = rec.Backend
	ev.Migration = rec.Migration.Clone()
	ev.Abandoned = []api.Abandoned{{CommandID: m.CommandID, Action: m.Action, Seq: m.Seq}}
	return nil
}

// placeAway places a migrating VM on a host other than from: pin if
// given, else the best of the others.
func (a admission) placeAway(from, pin string, spec api.VmSpec) (*api.Host, error) {
	if pin != "" {
		return a.place(pin, spec)
	}
	var others []*api.Host
	for _, h := range a.hosts.List() {
		// Only hosts whose backend takes a migration are candidates.
		if h.Host != from && (!h.Has(spec.Backend) || h.Can(spec.Backend, fsm.ActMigrate)) {
			others = append(others, h)
		}
	}
	p := hosts.Placement{
		Backend: spec.Backend, Need: api.Resources{Vcpus: spec.Vcpus, MemoryMB: spec.MemoryMB},
		Placed: a.placed, Image: spec.Image, HasImage: a.hasImage,
	}
	if a.count != nil {
		p.VMsOn = a.count.onHost
		p.MaxVMs = a.quotas.PerHost
	}
	h, err := hosts.Best(others, p)
	if err != nil {
		return nil, reject("placement: no other host can take vm %s: %v", spec.Name, err)
	}
	return h, nil
}

// place picks the host of a new VM: the pinned one if it can take it, else
// the best that can (hosts.Best: the most free memory, then the fewest
// VMs, then the first by name).
func (a admission) place(pin string, spec api.VmSpec) (*api.Host, error) {
	p := hosts.Placement{
		Backend:  spec.Backend,
		Need:     api.Resources{Vcpus: spec.Vcpus, MemoryMB: spec.MemoryMB},
		Placed:   a.placed,
		Image:    spec.Image,
		HasImage: a.hasImage,
	}
	if a.count != nil {
		p.VMsOn = a.count.onHost // the tie-break, and the per-host quota
		p.MaxVMs = a.quotas.PerHost
	}
	if pin != "" {
		h := a.hosts.Get(pin)
		if h == nil {
			return nil, reject("host: %q is not a known host (alive hosts: %s)", pin, a.aliveList())
		}
		if why := p.Fits(h); why != "" {
			if why == "lost" {
				why = "not alive (no heartbeat for over " + a.lostAfter.String() + ")"
			}
			return nil, reject("host: %q cannot take it: %s", pin, why)
		}
		return h, nil
	}
	h, err := hosts.Best(a.hosts.List(), p)
	if err != nil {
		return nil, reject("placement: %v", err)
	}
	return h, nil
}

func (a admission) aliveList() string {
	var names []string
	for _, h := range a.hosts.List() {
		if h.Alive {
			names = append(names, h.Host)
		}
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

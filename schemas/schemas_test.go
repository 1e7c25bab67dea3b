package schemas

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/fsm"
	"github.com/vmherd/vmherd/internal/projection"
)

// ---- examples built from the Go types ------------------------------------

var t0 = time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)

// fullSpec sets every VmSpec field (TestExamplesSetEveryField checks it).
func fullSpec() *api.VmSpec {
	return &api.VmSpec{
		Name:      "web1",
		Backend:   api.BackendQEMU,
		ImagePath: "/var/lib/images/base.qcow2",
		Vcpus:     2,
		MemoryMB:  2048,
		DiskGB:    20,
		UEFI:      true,
		Network:   &api.NetworkConfig{Type: api.NetworkVnic, Name: "vnic0", Link: "igb0"},
		CloudInit: &api.CloudInitConfig{
			UserData:      "#cloud-config\npackages: [nginx]\n",
			NetworkConfig: "version: 2\nethernets: {}\n",
			InstanceID:    "iid-web1",
			Hostname:      "web1",
		},
		SSH:    &api.SshConfig{User: "vm", PublicKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl vm@host"},
		Accel:  "kvm",
		Labels: map[string]string{"team": "web", "ci.example.com/job": "1234", "note": ""},
	}
}

// namedImageSpec is fullSpec with an image from the host's store instead
// of an image path (the two exclude each other).
func namedImageSpec() *api.VmSpec {
	s := fullSpec()
	s.ImagePath, s.Image = "", "debian-12"
	return s
}

// fullHandle sets every VmHandle field.
func fullHandle() *api.VmHandle {
	return &api.VmHandle{
		ID:        "01JQ3ZK5W8X9Y0A1B2C3D4E5F6",
		Name:      "web1",
		Backend:   api.BackendQEMU,
		Host:      "h1",
		PID:       4242,
		WorkDir:   "/var/lib/vmherd/vms/web1",
		Data:      json.RawMessage(`{"accel":"kvm","qmp_socket":"/var/lib/vmherd/vms/web1/qmp.sock","ssh_port":2222,"extra":{"base_format":"qcow2"}}`),
		Spec:      fullSpec(),
		StartedAt: t0,
	}
}

// eventOf builds a plausible event of type t for action a.
func eventOf(t api.EventType, a string) api.Event {
	ev := api.Event{Type: t, VM: "web1", CommandID: "cmd-1", Action: fsm.Action(a), Time: t0, Host: "h1"}
	switch t {
	case api.TypeAccepted:
		next, err := fsm.Decide(fromState(fsm.Action(a)), fsm.Action(a))
		if err != nil {
			panic(err)
		}
		ev.State, ev.Backend, ev.TimeoutS = next, api.BackendQEMU, 30
		if a == "prepare" {
			ev.Spec = fullSpec()
		} else {
			ev.Handle = fullHandle()
		}
		if a == "migrate" {
			ev.Migration = &api.Migration{From: "h1", To: "h2", Mode: api.MigrateLive, Before: api.StateRunning}
		}
		if a == "purge" {
			// Its outcome: the state it was purged from; no handle, no
			// timeout (admitPurge).
			ev.State, ev.Handle, ev.TimeoutS = api.StateDestroyed, nil, 0
		}
	case api.TypeMigrated:
		ev.Handle, ev.AcceptedSeq, ev.Host, ev.State = fullHandle(), 7, "h2", api.StateRunning
		ev.Migration = &api.Migration{From: "h1", To: "h2", Mode: api.MigrateLive, Before: api.StateRunning, Bytes: 1 << 30, Total: 1 << 30, DowntimeMS: 42}
	case api.TypeMigration:
		ev.Action, ev.AcceptedSeq, ev.Host, ev.Handle = "migrate", 7, "h2", fullHandle()
		ev.Migration = &api.Migration{From: "h1", To: "h2", Mode: api.MigrateLive, Before: api.StateRunning, Phase: api.PhaseTargetReady, Endpoint: "10.0.0.6:49152", Digest: strings.Repeat("ab", 32)}
	case api.TypeRejected:
		ev.Host, ev.State = "", fsm.StateAbsent
		ev.Reason = "cannot start: vm does not exist"
	case api.TypeFailed:
		ev.State, ev.Handle, ev.Error, ev.AcceptedSeq = api.StateFailed, fullHandle(), "qemu exited with status 1", 7
	case api.TypeExited:
		ev.CommandID, ev.Action = "", ""
		ev.State, ev.Handle, ev.Reason = api.StateStopped, fullHandle(), "guest powered off"
	case api.TypeFenced:
		ev.Handle, ev.AcceptedSeq, ev.Reason = fullHandle(), 7, "the vm was forgotten while this host was lost"
	default: // results
		ev.Handle, ev.AcceptedSeq = fullHandle(), 7
		ev.State, _ = fsm.Apply(transitional(fsm.Action(a)), fsm.Result(t))
	}
	return ev
}

// fromState is a state action a is allowed from.
func fromState(a fsm.Action) api.VmState { return fsm.Allowed(a)[0] }

func transitional(a fsm.Action) api.VmState {
	s, err := fsm.Decide(fromState(a), a)
	if err != nil {
		panic(err)
	}
	return s
}

// fullRecord sets every VmRecord field.
func fullRecord() *api.VmRecord {
	return &api.VmRecord{
		Name:          "web1",
		State:         api.StateStopping,
		InFlight:      []api.InFlight{{CommandID: "cmd-2", Action: "stop", Seq: 9}, {CommandID: "cmd-3", Action: "destroy", Seq: 10}},
		Host:          "h1",
		Backend:       api.BackendQEMU,
		Handle:        fullHandle(),
		Vcpus:         2,
		MemoryMB:      2048,
		Generation:    3,
		LastSeq:       10,
		LastEvent:     api.TypeAccepted,
		LastCommandID: "cmd-3",
		LastError:     "exited: guest powered off",
		Exit:          &api.Exit{Time: t0, Reason: "guest powered off"},
		Image:         "debian-12",
		Labels:        map[string]string{"team": "web"},
		Migration:     &api.Migration{From: "h1", To: "h2", Mode: api.MigrateCold, Before: api.StateStopped, Phase: api.PhaseCopying, Bytes: 1 << 20, Total: 1 << 21},
		CreatedAt:     t0,
		UpdatedAt:     t0.Add(time.Minute),
	}
}

// heartbeat is the VM_HOSTS value as host.json describes it (the worker
// has no Go type for it yet).
type heartbeat struct {
	Host           string                  `json:"host"`
	Version        string                  `json:"version"`
	Time           time.Time               `json:"time"`
	Backends       []api.BackendTag        `json:"backends"`
	DefaultBackend api.BackendTag          `json:"default_backend"`
	Capabilities   map[api.BackendTag]caps `json:"capabilities,omitempty"`
	Capacity       capacity                `json:"capacity"`
	Usage          usage                   `json:"usage"`
}

type caps struct {
	Suspend bool `json:"suspend"`
	Resume  bool `json:"resume"`
}

type capacity struct {
	Vcpus    int `json:"vcpus"`
	MemoryMB int `json:"memory_mb"`
}

type usage struct {
	VMs      int `json:"vms"`
	Vcpus    int `json:"vcpus"`
	MemoryMB int `json:"memory_mb"`
}

func fullHeartbeat() heartbeat {
	return heartbeat{
		Host: "h1", Version: "0.1.0", Time: t0,
		Backends:       []api.BackendTag{api.BackendNoop, api.BackendQEMU},
		DefaultBackend: api.BackendQEMU,
		Capabilities: map[api.BackendTag]caps{
			api.BackendNoop: {Suspend: true, Resume: true},
			api.BackendQEMU: {Suspend: true, Resume: true},
		},
		Capacity: capacity{Vcpus: 16, MemoryMB: 65536},
		Usage:    usage{VMs: 2, Vcpus: 3, MemoryMB: 2560},
	}
}

// fullStats sets every StatsReply field (TestExamplesSetEveryField).
func fullStats() api.StatsReply {
	return api.StatsReply{
		VM: "web1", Host: "h1", Backend: api.BackendQEMU, State: api.StateRunning,
		Time: t0.Add(time.Hour), StartedAt: t0, UptimeMS: 3600000, CPUNS: 42e9,
		Vcpus:       []api.VcpuStats{{Index: 1, ThreadID: 4243, CPUNS: 40e9}},
		MemoryBytes: 2 << 30, RSSBytes: 300 << 20,
		Disks:           []api.DiskStats{{Device: "disk", RdBytes: 1 << 20, WrBytes: 1 << 19, RdOps: 256, WrOps: 128}},
		Nets:            []api.NetStats{{Name: "vmtap0", RxBytes: 4096, TxBytes: 2048, RxPackets: 8, TxPackets: 4}},
		NetsUnavailable: "user-mode networking",
		Simulated:       true,
	}
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ---- compile and catalogue ------------------------------------------------

func TestEverySchemaCompiles(t *testing.T) {
	c, list, err := compileAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(c) != len(list) {
		t.Fatalf("%d schemas compiled, %d listed", len(c), len(list))
	}
	var want []string
	for _, a := range fsm.Actions {
		want = append(want, "command."+string(a))
	}
	for _, ty := range api.EventTypes {
		want = append(want, "event."+string(ty))
	}
	want = append(want, "cordon", "host", "host_event", "image", "record", "stats", "task")
	sort.Strings(want)
	if got := Names(); !slices.Equal(got, want) {
		t.Fatalf("Names() = %v\nwant      %v", got, want)
	}
}

// The package's own lists must follow the Go packages they mirror.
func TestListsMatchGo(t *testing.T) {
	var acts []string
	for _, a := range fsm.Actions {
		acts = append(acts, string(a))
	}
	if !slices.Equal(actions, acts) {
		t.Errorf("actions %v, fsm.Actions %v", actions, acts)
	}
	var types []string
	for _, ty := range api.EventTypes {
		types = append(types, string(ty))
	}
	if !slices.Equal(eventTypes, types) {
		t.Errorf("eventTypes %v, api.EventTypes %v", eventTypes, types)
	}
	if got, want := enumOf(t, "host-event-type"), strs(api.HostEventTypes); !slices.Equal(got, want) {
		t.Errorf("defs.json host-event-type %v, api.HostEventTypes %v", got, want)
	}
}

// ---- valid examples --------------------------------------------------------

func TestValidCommands(t *testing.T) {
	type tc struct {
		action string
		cmd    api.Command
	}
	cases := []tc{
		{"prepare", api.Command{CommandID: "cmd-1", Spec: fullSpec(), TimeoutS: 300, Host: "h1"}},
		{"prepare", api.Command{CommandID: "cmd-2", Spec: namedImageSpec()}},
		{"prepare", api.Command{Spec: &api.VmSpec{}}},
		{"prepare", api.Command{Spec: &api.VmSpec{Backend: api.BackendNoop}}},
		{"prepare", api.Command{Spec: &api.VmSpec{Name: "a", Backend: api.BackendPropolis, ImagePath: "/img", Network: &api.NetworkConfig{Type: api.NetworkVnic}}}},
		{"prepare", api.Command{Spec: &api.VmSpec{Network: &api.NetworkConfig{Type: api.NetworkUser}}}},
		{"prepare", api.Command{Spec: &api.VmSpec{Network: &api.NetworkConfig{Type: api.NetworkTap, Bridge: "br0"}}}},
		{"prepare", api.Command{Spec: &api.VmSpec{Network: &api.NetworkConfig{Type: api.NetworkTap}}}},
		{"prepare", api.Command{Spec: &api.VmSpec{Network: &api.NetworkConfig{Type: api.NetworkNone}}}},
		// Limits, inclusive.
		{"prepare", api.Command{
			CommandID: strings.Repeat("c", 128), TimeoutS: 86400, Host: strings.Repeat("h", 63),
			Spec: &api.VmSpec{
				Name: strings.Repeat("a", 63), Vcpus: api.MaxVcpus, MemoryMB: api.MaxMemoryMB, DiskGB: api.MaxDiskGB,
				CloudInit: &api.CloudInitConfig{
					UserData: strings.Repeat("u", api.MaxUserDataSize), NetworkConfig: strings.Repeat("n", api.MaxUserDataSize),
					InstanceID: strings.Repeat("i", 255), Hostname: strings.Repeat("h", 63),
				},
				SSH: &api.SshConfig{User: strings.Repeat("u", 32), PublicKey: strings.Repeat("k", 16<<10)},
			},
		}},
		{"prepare", api.Command{TimeoutS: 1, Spec: &api.VmSpec{Name: "a_b-c9", Vcpus: 1, MemoryMB: api.MinMemoryMB, Accel: "auto"}}},
	}
	for _, a := range fsm.Actions[1:] {
		cases = append(cases,
			tc{string(a), api.Command{}},
			tc{string(a), api.Command{CommandID: "vmctl/ünïcode:ok#1"}},
		)
		if a != fsm.ActPurge { // purge has no backend call to bound
			cases = append(cases, tc{string(a), api.Command{CommandID: "7c9e6679-7425-40de-944b-e07fc1f90ae7", TimeoutS: 30}})
		}
	}
	// U+FFFD the sender wrote, and surrogate pairs, are fine.
	cases = append(cases,
		tc{"prepare", api.Command{CommandID: "x\ufffd", Spec: &api.VmSpec{CloudInit: &api.CloudInitConfig{UserData: "a\ufffd😀b", Hostname: "web-one"}}}},
		tc{"prepare", api.Command{Spec: &api.VmSpec{Network: &api.NetworkConfig{Type: api.NetworkTap, Bridge: "br-0.x_1"}}}},
	)
	for i, c := range cases {
		body := mustJSON(t, c.cmd)
		if err := ValidateCommand(c.action, body); err != nil {
			t.Errorf("%d: %s %.200s: %v", i, c.action, body, err)
		}
		if err := Validate("command."+c.action, body); err != nil {
			t.Errorf("%d: Validate(command.%s): %v", i, c.action, err)
		}
		// Decoded from the checked document, it is what encoding/json
		// makes of the same body: every field, every type.
		var got, want api.Command
		if err := DecodeCommand(c.action, body, &got); err != nil {
			t.Errorf("%d: DecodeCommand(%s): %v", i, c.action, err)
		}
		if err := json.Unmarshal(body, &want); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%d: DecodeCommand(%s) = %+v, encoding/json has %+v", i, c.action, got, want)
		}
	}
}

// DecodeCommand fills nothing from a body that fails, and reports what
// failed as Validate does.
func TestDecodeCommandRejects(t *testing.T) {
	for _, c := range []struct{ action, body, want string }{
		{"start", `{"timeout_s":2.0}`, "timeout_s: must be an integer"},
		{"start", `{"command_id":"a","command_id":"b"}`, "duplicate field"},
		{"start", `{"spec":{}}`, "spec"},
		{"prepare", `{"spec":{"vcpus":"2"}}`, "spec.vcpus: must be an integer"},
		{"launch", `{}`, "unknown action"},
	} {
		cmd := api.Command{CommandID: "untouched"}
		err := DecodeCommand(c.action, []byte(c.body), &cmd)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s %s: error %v, want one with %q", c.action, c.body, err, c.want)
		}
		if !errors.Is(err, api.ErrInvalid) {
			t.Errorf("%s %s: %v is not api.ErrInvalid", c.action, c.body, err)
		}
		if cmd.CommandID != "untouched" || cmd.Spec != nil {
			t.Errorf("%s %s: filled %+v", c.action, c.body, cmd)
		}
	}
}

func TestValidEvents(t *testing.T) {
	var evs []api.Event
	for _, a := range fsm.Actions {
		if a == fsm.ActPurge {
			evs = append(evs, eventOf(api.TypeAccepted, string(a))) // no result
			continue
		}
		evs = append(evs, eventOf(api.TypeAccepted, string(a)), eventOf(api.ResultOf(a), string(a)),
			eventOf(api.TypeFailed, string(a)))
	}
	evs = append(evs, eventOf(api.TypeRejected, "start"), eventOf(api.TypeExited, ""),
		eventOf(api.TypeFenced, "destroy"))

	// Variants: a rejection of an invalid name and an unknown action; a
	// destroyed without a handle; a failed without one; zero time.
	rej := eventOf(api.TypeRejected, "reboot")
	rej.VM, rej.State, rej.Reason = "Web.1/../x", "", "name: must match ..."
	rej2 := eventOf(api.TypeRejected, "start")
	rej2.State, rej2.Host = api.StateRunning, "h1"
	gone := eventOf(api.TypeDestroyed, "destroy")
	gone.Handle = nil
	fail := eventOf(api.TypeFailed, "prepare")
	fail.Handle, fail.State = nil, ""
	zero := eventOf(api.TypeRejected, "start")
	zero.Time = time.Time{}
	// A forget: accepted from destroying, with the abandoned destroy; its
	// destroyed result from the engines says why.
	forget := eventOf(api.TypeAccepted, "destroy")
	forget.Forget, forget.Abandoned = true, []api.Abandoned{{CommandID: "cmd-0", Action: "destroy", Seq: 6}}
	forgotten := eventOf(api.TypeDestroyed, "destroy")
	forgotten.Handle, forgotten.Reason = nil, "forgotten: host h1 is lost"
	// A migration's phase; a cancel of a migration (accepted, the state
	// returned to) and the failed result the engines store for it.
	phase := eventOf(api.TypeMigration, "migrate")
	cancel := eventOf(api.TypeAccepted, "migrate")
	cancel.Cancel, cancel.State, cancel.Handle = true, api.StateRunning, nil
	cancel.Abandoned = []api.Abandoned{{CommandID: "cmd-0", Action: "migrate", Seq: 6}}
	cancelled := eventOf(api.TypeFailed, "migrate")
	cancelled.Handle, cancelled.State = nil, api.StateRunning
	cancelled.Migration = &api.Migration{From: "h1", To: "h2", Mode: api.MigrateLive, Before: api.StateRunning, CancelledBy: "cmd-1"}
	evs = append(evs, rej, rej2, gone, fail, zero, forget, forgotten, phase, cancel, cancelled)

	seen := map[api.EventType]bool{}
	for i, ev := range evs {
		body := ev.Encode()
		if err := ValidateEvent(body); err != nil {
			t.Errorf("%d: %s: %v\n%s", i, ev.Type, err, body)
		}
		if err := Validate("event."+string(ev.Type), body); err != nil {
			t.Errorf("%d: Validate(event.%s): %v", i, ev.Type, err)
		}
		seen[ev.Type] = true
	}
	for _, ty := range api.EventTypes {
		if !seen[ty] {
			t.Errorf("no example of %s", ty)
		}
	}
}

func TestValidTaskRecordHost(t *testing.T) {
	for _, a := range fsm.Actions {
		ev := eventOf(api.TypeAccepted, string(a))
		task := events.TaskFromAccepted(&ev, 42)
		if err := Validate("task", mustJSON(t, task)); err != nil {
			t.Errorf("task %s: %v", a, err)
		}
	}
	if err := Validate("task", mustJSON(t, events.Task{CommandID: "c", VM: "v", Action: "start", Host: "h", AcceptedSeq: 1})); err != nil {
		t.Errorf("minimal task: %v", err)
	}

	if err := Validate("record", fullRecord().Marshal()); err != nil {
		t.Errorf("full record: %v", err)
	}
	// Records the projection really builds, event by event.
	var rec *api.VmRecord
	seq := uint64(0)
	for _, ev := range []api.Event{
		eventOf(api.TypeAccepted, "prepare"), eventOf(api.TypePrepared, "prepare"),
		eventOf(api.TypeAccepted, "start"), eventOf(api.TypeStarted, "start"),
		eventOf(api.TypeExited, ""),
		eventOf(api.TypeAccepted, "start"), eventOf(api.TypeFailed, "start"),
		eventOf(api.TypeAccepted, "destroy"), eventOf(api.TypeDestroyed, "destroy"),
	} {
		seq++
		ev.CommandID = fmt.Sprintf("cmd-%d", seq/2)
		if ev.Type == api.TypeExited {
			ev.CommandID = ""
		}
		rec = projection.Fold(rec, &ev, seq)
		if err := Validate("record", rec.Marshal()); err != nil {
			t.Errorf("record after %s: %v\n%s", ev.Type, err, rec.Marshal())
		}
	}
	if rec.State != api.StateDestroyed {
		t.Errorf("fold ended in %s", rec.State)
	}

	if err := Validate("host", mustJSON(t, fullHeartbeat())); err != nil {
		t.Errorf("host: %v", err)
	}
	if err := Validate("stats", mustJSON(t, fullStats())); err != nil {
		t.Errorf("stats: %v", err)
	}
	minimal := api.StatsReply{VM: "web1", Host: "h1", Backend: api.BackendNoop, State: api.StateSuspended, Time: t0,
		Vcpus: []api.VcpuStats{}, Disks: []api.DiskStats{}}
	if err := Validate("stats", mustJSON(t, minimal)); err != nil {
		t.Errorf("minimal stats: %v", err)
	}
	// Open for newer workers' fields.
	var hb map[string]any
	_ = json.Unmarshal(mustJSON(t, fullHeartbeat()), &hb)
	hb["load"] = 0.5
	hb["capacity"].(map[string]any)["gpus"] = 1
	if err := Validate("host", mustJSON(t, hb)); err != nil {
		t.Errorf("host with new fields: %v", err)
	}
}

// Handles are open to fields newer backends add.
func TestHandleForwardCompatible(t *testing.T) {
	ev := eventOf(api.TypeStarted, "start")
	var m map[string]any
	_ = json.Unmarshal(ev.Encode(), &m)
	h := m["handle"].(map[string]any)
	h["cloud_hypervisor_api"] = "/run/ch.sock"
	h["spec"].(map[string]any)["tpm"] = true
	if err := ValidateEvent(mustJSON(t, m)); err != nil {
		t.Fatal(err)
	}
	// ... but the envelope is closed.
	m["extra_field"] = 1
	if err := ValidateEvent(mustJSON(t, m)); err == nil || !strings.Contains(err.Error(), `unknown field "extra_field"`) {
		t.Fatalf("closed envelope: %v", err)
	}
}

// The examples must set every field, so a field added to a Go type without
// its schema fails the valid-example tests.
func TestExamplesSetEveryField(t *testing.T) {
	for name, v := range map[string]any{
		"VmSpec": *fullSpec(), "CloudInitConfig": *fullSpec().CloudInit, "SshConfig": *fullSpec().SSH,
		"VmHandle": *fullHandle(), "VmRecord": *fullRecord(), "InFlight": fullRecord().InFlight[0],
		"StatsReply": fullStats(), "VcpuStats": fullStats().Vcpus[0], "DiskStats": fullStats().Disks[0], "NetStats": fullStats().Nets[0],
	} {
		rv := reflect.ValueOf(v)
		for i := range rv.NumField() {
			if name == "VmSpec" && !reflect.ValueOf(*namedImageSpec()).Field(i).IsZero() {
				continue // image and image_path exclude each other
			}
			if rv.Field(i).IsZero() {
				t.Errorf("%s example leaves %s unset", name, rv.Type().Field(i).Name)
			}
		}
	}
}

// ---- schemas against Go types ----------------------------------------------

// schemaDoc reads an embedded schema file.
func schemaDoc(t *testing.T, file string) map[string]any {
	t.Helper()
	b, err := files.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func def(t *testing.T, name string) map[string]any {
	t.Helper()
	d, ok := schemaDoc(t, defsFile)["$defs"].(map[string]any)[name].(map[string]any)
	if !ok {
		t.Fatalf("defs.json has no %s", name)
	}
	return d
}

func propNames(s map[string]any) []string {
	var out []string
	for k := range s["properties"].(map[string]any) {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func jsonFields(v any) []string {
	var out []string
	rt := reflect.TypeOf(v)
	for i := range rt.NumField() {
		tag := strings.Split(rt.Field(i).Tag.Get("json"), ",")[0]
		if tag != "" && tag != "-" {
			out = append(out, tag)
		}
	}
	sort.Strings(out)
	return out
}

func TestPropertiesMatchGoFields(t *testing.T) {
	check := func(what string, got, want []string) {
		t.Helper()
		if !slices.Equal(got, want) {
			t.Errorf("%s: schema properties %v\n  Go JSON fields %v", what, got, want)
		}
	}
	check("vm-spec", propNames(def(t, "vm-spec")), jsonFields(api.VmSpec{}))
	check("vm-spec-recorded", propNames(def(t, "vm-spec-recorded")), jsonFields(api.VmSpec{}))
	check("vm-handle", propNames(def(t, "vm-handle")), jsonFields(api.VmHandle{}))
	check("cloud-init", propNames(def(t, "cloud-init")), jsonFields(api.CloudInitConfig{}))
	check("ssh", propNames(def(t, "ssh")), jsonFields(api.SshConfig{}))
	var net []string
	for _, v := range []string{"network-user", "network-tap", "network-vnic", "network-none"} {
		for _, p := range propNames(def(t, v)) {
			if !slices.Contains(net, p) {
				net = append(net, p)
			}
		}
	}
	sort.Strings(net)
	check("network-config variants", net, jsonFields(api.NetworkConfig{}))
	for _, a := range fsm.Actions {
		f := "command." + string(a) + ".json"
		check(f, propNames(schemaDoc(t, f)), jsonFields(api.Command{}))
	}
	for _, ty := range api.EventTypes {
		f := "event." + string(ty) + ".json"
		check(f, propNames(schemaDoc(t, f)), jsonFields(api.Event{}))
	}
	check("task.json", propNames(schemaDoc(t, "task.json")), jsonFields(events.Task{}))
	check("image.json", propNames(schemaDoc(t, "image.json")), jsonFields(api.ImageStatus{}))
	rec := schemaDoc(t, "record.json")
	check("record.json", propNames(rec), jsonFields(api.VmRecord{}))
	items := rec["properties"].(map[string]any)["in_flight"].(map[string]any)["items"].(map[string]any)
	check("record.json in_flight", propNames(items), jsonFields(api.InFlight{}))
	st := schemaDoc(t, "stats.json")
	check("stats.json", propNames(st), jsonFields(api.StatsReply{}))
	for prop, v := range map[string]any{"vcpus": api.VcpuStats{}, "disks": api.DiskStats{}, "nets": api.NetStats{}} {
		items := st["properties"].(map[string]any)[prop].(map[string]any)["items"].(map[string]any)
		check("stats.json "+prop, propNames(items), jsonFields(v))
	}
}

func enumOf(t *testing.T, name string) []string {
	t.Helper()
	var out []string
	for _, v := range def(t, name)["enum"].([]any) {
		out = append(out, v.(string))
	}
	return out
}

func TestEnumsAndLimitsMatchGo(t *testing.T) {
	strs := func(vs ...any) []string {
		var out []string
		for _, v := range vs {
			out = append(out, fmt.Sprint(v))
		}
		return out
	}
	var backends, acts, types, trans []string
	for _, b := range api.Backends {
		backends = append(backends, string(b))
	}
	for _, a := range fsm.Actions {
		acts = append(acts, string(a))
	}
	for _, ty := range api.EventTypes {
		types = append(types, string(ty))
	}
	states := strs(api.StatePreparing, api.StatePrepared, api.StateStarting, api.StateRunning, api.StateStopping,
		api.StateStopped, api.StateSuspending, api.StateSuspended, api.StateResuming, api.StateDestroying,
		api.StateDestroyed, api.StateFailed, api.StateMigrating)
	for _, s := range states {
		if fsm.Transitional(api.VmState(s)) {
			trans = append(trans, s)
		}
	}
	for _, c := range []struct {
		def  string
		want []string
	}{
		{"backend", backends},
		{"action", acts},
		{"event-type", types},
		{"state", states},
		{"state-or-absent", append([]string{string(fsm.StateAbsent)}, states...)},
		{"transitional-state", trans},
	} {
		if got := enumOf(t, c.def); !slices.Equal(got, c.want) {
			t.Errorf("%s enum %v, Go %v", c.def, got, c.want)
		}
	}

	if p := def(t, "name")["pattern"]; p != api.NamePattern {
		t.Errorf("name pattern %v, api.NamePattern %v", p, api.NamePattern)
	}
	labels := def(t, "labels")
	if p := labels["propertyNames"].(map[string]any)["pattern"]; p != api.LabelKeyPattern {
		t.Errorf("labels key pattern %v, api.LabelKeyPattern %v", p, api.LabelKeyPattern)
	}
	if n := labels["maxProperties"].(float64); int(n) != api.MaxLabels {
		t.Errorf("labels maxProperties %v, api.MaxLabels %d", n, api.MaxLabels)
	}
	if n := labels["propertyNames"].(map[string]any)["maxLength"].(float64); int(n) != api.MaxLabelKeyLen {
		t.Errorf("labels key maxLength %v, api.MaxLabelKeyLen %d", n, api.MaxLabelKeyLen)
	}
	if n := labels["additionalProperties"].(map[string]any)["maxLength"].(float64); int(n) != api.MaxLabelValueLen {
		t.Errorf("labels value maxLength %v, api.MaxLabelValueLen %d", n, api.MaxLabelValueLen)
	}
	if p := def(t, "command-id")["pattern"]; p != commandIDPattern {
		t.Errorf("command-id pattern %q, commandIDPattern %q", p, commandIDPattern)
	}
	props := def(t, "vm-spec-recorded")["properties"].(map[string]any)
	num := func(path ...string) float64 {
		var v any = props
		for _, p := range path {
			v = v.(map[string]any)[p]
		}
		return v.(float64)
	}
	for _, c := range []struct {
		got  float64
		want int
		what string
	}{
		{num("vcpus", "minimum"), 1, "vcpus minimum"},
		{num("vcpus", "maximum"), api.MaxVcpus, "vcpus maximum"},
		{num("memory_mb", "minimum"), api.MinMemoryMB, "memory_mb minimum"},
		{num("memory_mb", "maximum"), api.MaxMemoryMB, "memory_mb maximum"},
		{num("disk_gb", "minimum"), 0, "disk_gb minimum"},
		{num("disk_gb", "maximum"), api.MaxDiskGB, "disk_gb maximum"},
		{def(t, "name")["maxLength"].(float64), api.MaxNameLen, "name maxLength"},
		{def(t, "cloud-init")["properties"].(map[string]any)["user_data"].(map[string]any)["maxLength"].(float64), api.MaxUserDataSize, "user_data maxLength"},
		{def(t, "cloud-init")["properties"].(map[string]any)["network_config"].(map[string]any)["maxLength"].(float64), api.MaxUserDataSize, "network_config maxLength"},
	} {
		if int(c.got) != c.want {
			t.Errorf("%s is %v in the schema, %d in Go", c.what, c.got, c.want)
		}
	}
}

// ---- invalid bodies ---------------------------------------------------------

func spec(fields string) string { return `{"spec":{` + fields + `}}` }

func TestInvalidCommands(t *testing.T) {
	big := `{"command_id":"x"` + strings.Repeat(" ", MaxBodySize) + `}`
	deep := `{"spec":{"cloud_init":` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}}`
	cases := []struct {
		action, body string
		want         []string // substrings of the error
	}{
		// labels
		{"prepare", spec(`"labels":{"-x":"v"}`), []string{"spec.labels"}},
		{"prepare", spec(`"labels":{"a/b/c":"v"}`), []string{"spec.labels"}},
		{"prepare", spec(`"labels":{"team":"a\nb"}`), []string{"spec.labels.team"}},
		{"prepare", spec(`"labels":{"team":"\u202egnp.exe"}`), []string{"spec.labels.team"}},
		{"prepare", spec(`"labels":{"team":"a​b"}`), []string{"spec.labels.team"}},
		{"prepare", spec(`"labels":{"team":1}`), []string{"spec.labels.team"}},
		{"prepare", spec(`"labels":{"team":"` + strings.Repeat("v", 64) + `"}`), []string{"spec.labels.team"}},
		{"prepare", spec(`"labels":"team=ci"`), []string{"spec.labels"}},
		// actions
		{"reboot", `{}`, []string{"action", `unknown action "reboot"`}},
		{"", `{}`, []string{"action"}},
		{"Start", `{}`, []string{"action"}},
		{"start ", `{}`, []string{"action"}},
		// not JSON, not an object, too big, too deep
		{"start", `{`, []string{"body is not valid JSON"}},
		{"start", `{"timeout_s":}`, []string{"body is not valid JSON", "at byte"}},
		{"start", ``, []string{"body is not valid JSON", "empty"}},
		{"start", "  \n", []string{"body is not valid JSON"}},
		{"start", `{} {}`, []string{"body is not valid JSON"}},
		{"start", `{"a":1}x`, []string{"body is not valid JSON"}},
		{"start", `null`, []string{"body: must be an object, not null"}},
		{"start", `[]`, []string{"body: must be an object"}},
		{"start", `"start"`, []string{"body: must be an object"}},
		{"start", big, []string{fmt.Sprintf("body: %d bytes is too large (at most 1048576)", len(big))}},
		{"prepare", deep, []string{"spec.cloud_init", "levels deep"}},
		{"start", `{"timeout_s":1,"timeout_s":2}`, []string{`body: duplicate field "timeout_s"`}},
		{"prepare", spec(`"vcpus":1,"vcpus":1000`), []string{`spec: duplicate field "vcpus"`}},
		// unknown fields
		{"start", `{"foo":1}`, []string{`unknown field "foo"`}},
		{"start", `{"Command_ID":"x"}`, []string{`unknown field "Command_ID"`}},
		{"prepare", `{"spec":{},"foo":1}`, []string{`unknown field "foo"`}},
		{"prepare", spec(`"foo":1`), []string{`spec: unknown field "foo"`}},
		// image by name or by path, not both; one of them for qemu
		{"prepare", spec(`"image":"debian-12","image_path":"/x"`), []string{"spec.image_path: is not allowed"}},
		{"prepare", spec(`"backend":"qemu"`), []string{"spec.image: is required", "spec.image_path: is required"}},
		{"prepare", spec(`"image":"Debian 12"`), []string{"spec.image", "does not match"}},
		{"prepare", spec(`"Vcpus":2`), []string{`spec: unknown field "Vcpus"`}},
		{"prepare", spec(`"cloud_init":{"userdata":""}`), []string{`spec.cloud_init: unknown field "userdata"`}},
		{"prepare", spec(`"ssh":{"key":""}`), []string{`spec.ssh: unknown field "key"`}},
		{"prepare", spec(`"network":{"type":"user","bridge":"br0"}`), []string{`spec.network: unknown field "bridge"`}},
		{"prepare", spec(`"network":{"type":"tap","name":"vnic0"}`), []string{`spec.network: unknown field "name"`}},
		// prepare-only fields, missing spec
		{"prepare", `{}`, []string{"spec: is required"}},
		{"prepare", `{"command_id":"c1","host":"h1"}`, []string{"spec: is required"}},
		{"prepare", `{"spec":null}`, []string{"spec: must be an object, not null"}},
		{"prepare", `{"spec":"web1"}`, []string{"spec: must be an object"}},
		{"start", `{"spec":{}}`, []string{"spec: is only allowed on prepare"}},
		{"destroy", `{"spec":{"name":"web1"}}`, []string{"spec"}},
		{"start", `{"host":"h1"}`, []string{"host: is only allowed on prepare"}},
		{"stop", `{"host":"h1"}`, []string{"host"}},
		{"resume", `{"host":""}`, []string{"host"}},
		// names
		{"prepare", spec(`"name":"web.1"`), []string{"spec.name", "does not match pattern"}},
		{"prepare", spec(`"name":"a/b"`), []string{"spec.name"}},
		{"prepare", spec(`"name":".."`), []string{"spec.name"}},
		{"prepare", spec(`"name":"../etc"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"web1/.."`), []string{"spec.name"}},
		{"prepare", spec(`"name":"Web1"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"wéb"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"web\u0131"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"ｗｅｂ"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"-web"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"web-"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"web 1"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"web*"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"web>"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"web\n"`), []string{"spec.name"}},
		{"prepare", spec(`"name":"web\u0000"`), []string{"spec.name"}},
		{"prepare", spec(`"name":""`), []string{"spec.name"}},
		{"prepare", spec(`"name":"` + strings.Repeat("a", 64) + `"`), []string{"spec.name", "at most 63"}},
		{"prepare", spec(`"name":"` + strings.Repeat("a", 1000) + `"`), []string{"spec.name"}},
		{"prepare", spec(`"name":1`), []string{"spec.name: must be a string, not a number"}},
		{"prepare", `{"spec":{},"host":"h.1"}`, []string{"host", "does not match pattern"}},
		{"prepare", `{"spec":{},"host":""}`, []string{"host"}},
		{"prepare", `{"spec":{},"host":"H1"}`, []string{"host"}},
		// sizes
		{"prepare", spec(`"vcpus":-1`), []string{"spec.vcpus: must be >= 1 but found -1"}},
		{"prepare", spec(`"vcpus":0`), []string{"spec.vcpus: must be >= 1 but found 0"}},
		{"prepare", spec(`"vcpus":256`), []string{"spec.vcpus: must be <= 255 but found 256"}},
		{"prepare", spec(`"vcpus":99999999999999999999999999`), []string{"spec.vcpus: must be <= 255"}},
		{"prepare", spec(`"vcpus":-99999999999999999999999999`), []string{"spec.vcpus: must be >= 1"}},
		{"prepare", spec(`"vcpus":2.5`), []string{"spec.vcpus: must be an integer, not 2.5"}},
		{"prepare", spec(`"vcpus":2.0`), []string{"spec.vcpus: must be an integer, not 2.0"}},
		{"prepare", spec(`"vcpus":1e2`), []string{"spec.vcpus: must be an integer"}},
		{"prepare", spec(`"vcpus":"2"`), []string{"spec.vcpus: must be an integer, not a string"}},
		{"prepare", spec(`"vcpus":null`), []string{"spec.vcpus"}},
		{"prepare", spec(`"vcpus":true`), []string{"spec.vcpus"}},
		{"prepare", spec(`"memory_mb":63`), []string{"spec.memory_mb: must be >= 64 but found 63"}},
		{"prepare", spec(`"memory_mb":-1`), []string{"spec.memory_mb"}},
		{"prepare", spec(`"memory_mb":4194305`), []string{"spec.memory_mb: must be <= 4194304"}},
		{"prepare", spec(`"memory_mb":9223372036854775808`), []string{"spec.memory_mb"}},
		{"prepare", spec(`"disk_gb":-1`), []string{"spec.disk_gb"}},
		{"prepare", spec(`"disk_gb":65537`), []string{"spec.disk_gb"}},
		{"prepare", spec(`"uefi":"yes"`), []string{"spec.uefi: must be a boolean, not a string"}},
		{"prepare", spec(`"uefi":1`), []string{"spec.uefi"}},
		// enums
		{"prepare", spec(`"backend":"xen"`), []string{"spec.backend", `"xen"`}},
		{"prepare", spec(`"backend":""`), []string{"spec.backend"}},
		{"prepare", spec(`"backend":"QEMU"`), []string{"spec.backend"}},
		{"prepare", spec(`"accel":"hvf"`), []string{"spec.accel"}},
		{"prepare", spec(`"accel":""`), []string{"spec.accel"}},
		// image path
		{"prepare", spec(`"backend":"qemu"`), []string{"spec.image_path: is required"}},
		{"prepare", spec(`"backend":"propolis","image_path":"   "`), []string{"spec.image_path", "blank"}},
		{"prepare", spec(`"image_path":"/img\u0000.qcow2"`), []string{"spec.image_path"}},
		{"prepare", spec(`"image_path":"/` + strings.Repeat("x", 4096) + `"`), []string{"spec.image_path"}},
		{"prepare", spec(`"image_path":["/a"]`), []string{"spec.image_path"}},
		// network
		{"prepare", spec(`"network":"user"`), []string{"spec.network: must be an object"}},
		{"prepare", spec(`"network":{}`), []string{"spec.network.type: is required"}},
		{"prepare", spec(`"network":{"type":"bridge"}`), []string{"spec.network.type", `"bridge"`}},
		{"prepare", spec(`"network":{"type":"tap","bridge":"br0;rm"}`), []string{"spec.network.bridge"}},
		{"prepare", spec(`"network":{"type":"tap","bridge":".."}`), []string{"spec.network.bridge"}},
		{"prepare", spec(`"network":{"type":"tap","bridge":""}`), []string{"spec.network.bridge"}},
		{"prepare", spec(`"network":{"type":"tap","bridge":"` + strings.Repeat("b", 16) + `"}`), []string{"spec.network.bridge"}},
		{"prepare", spec(`"network":{"type":"vnic","name":"vnic/0"}`), []string{"spec.network.name"}},
		{"prepare", spec(`"network":{"type":"vnic","name":"vnic0","link":"a b"}`), []string{"spec.network.link"}},
		// cloud-init and ssh
		{"prepare", spec(`"cloud_init":{"user_data":"` + strings.Repeat("x", api.MaxUserDataSize+1) + `"}`), []string{"spec.cloud_init.user_data: must be at most 65536 characters long but has 65537"}},
		{"prepare", spec(`"cloud_init":{"network_config":"` + strings.Repeat("x", api.MaxUserDataSize+1) + `"}`), []string{"spec.cloud_init.network_config"}},
		{"prepare", spec(`"cloud_init":{"user_data":1}`), []string{"spec.cloud_init.user_data"}},
		{"prepare", spec(`"cloud_init":{"instance_id":"a\nb"}`), []string{"spec.cloud_init.instance_id"}},
		{"prepare", spec(`"cloud_init":{"instance_id":"` + strings.Repeat("i", 256) + `"}`), []string{"spec.cloud_init.instance_id"}},
		{"prepare", spec(`"cloud_init":{"hostname":"a b"}`), []string{"spec.cloud_init.hostname"}},
		{"prepare", spec(`"cloud_init":{"hostname":"` + strings.Repeat("h", 64) + `"}`), []string{"spec.cloud_init.hostname"}},
		{"prepare", spec(`"cloud_init":"#cloud-config"`), []string{"spec.cloud_init"}},
		{"prepare", spec(`"ssh":{"user":"a:b"}`), []string{"spec.ssh.user"}},
		{"prepare", spec(`"ssh":{"user":"root\n"}`), []string{"spec.ssh.user"}},
		{"prepare", spec(`"ssh":{"user":"` + strings.Repeat("u", 33) + `"}`), []string{"spec.ssh.user"}},
		{"prepare", spec(`"ssh":{"public_key":"ssh-ed25519 AAAA\nssh-rsa BBBB"}`), []string{"spec.ssh.public_key"}},
		{"prepare", spec(`"ssh":{"public_key":"` + strings.Repeat("k", 16<<10+1) + `"}`), []string{"spec.ssh.public_key"}},
		// command id and timeout
		{"start", `{"command_id":""}`, []string{"command_id: must not be empty"}},
		{"start", `{"command_id":"a b"}`, []string{"command_id", "does not match pattern"}},
		{"start", `{"command_id":"a\tb"}`, []string{"command_id"}},
		{"start", `{"command_id":"a\u00a0b"}`, []string{"command_id"}},
		{"start", `{"command_id":"a\u2028b"}`, []string{"command_id"}},
		{"start", `{"command_id":"a\u0085b"}`, []string{"command_id"}},
		{"start", `{"command_id":"` + strings.Repeat("c", 129) + `"}`, []string{"command_id: must be at most 128 characters"}},
		{"start", `{"command_id":123}`, []string{"command_id: must be a string, not a number"}},
		{"start", `{"timeout_s":0}`, []string{"timeout_s: must be >= 1 but found 0"}},
		{"stop", `{"timeout_s":-5}`, []string{"timeout_s"}},
		{"stop", `{"timeout_s":86401}`, []string{"timeout_s: must be <= 86400"}},
		{"stop", `{"timeout_s":"30"}`, []string{"timeout_s"}},
		{"stop", `{"timeout_s":1.5}`, []string{"timeout_s"}},
		{"stop", `{"timeout_s":1e400}`, []string{"timeout_s"}},
		// Invalid UTF-8 and lone surrogates are refused, never turned into
		// U+FFFD (issue #22, item 8).
		{"prepare", spec(`"cloud_init":{"user_data":"#cloud-config\n` + "\xff\xfe" + `"}`), []string{"spec.cloud_init.user_data: is not valid UTF-8"}},
		{"start", `{"command_id":"c` + "\xc3" + `"}`, []string{"command_id: is not valid UTF-8"}},
		{"start", `{"command_id":"c\ud800"}`, []string{"command_id: is not valid UTF-8"}},
		{"start", `{"command_id":"c\udc00\ud83d"}`, []string{"command_id: is not valid UTF-8"}},
		{"prepare", spec(`"cloud_init":{"user_data":"\ud83dx"}`), []string{"spec.cloud_init.user_data: is not valid UTF-8"}},
		{"start", `{"` + "\xff" + `":1}`, []string{"body: is not valid UTF-8"}},
		// Control characters in the hostname and instance id; interface
		// and link names that ip/dladm would take for options.
		{"prepare", spec(`"cloud_init":{"hostname":"web\u0000"}`), []string{"spec.cloud_init.hostname", "does not match"}},
		{"prepare", spec(`"cloud_init":{"hostname":"a\tb"}`), []string{"spec.cloud_init.hostname"}},
		{"prepare", spec(`"cloud_init":{"hostname":"a\u001b[2J"}`), []string{"spec.cloud_init.hostname"}},
		{"prepare", spec(`"cloud_init":{"hostname":"a\u0085"}`), []string{"spec.cloud_init.hostname"}},
		{"prepare", spec(`"cloud_init":{"instance_id":"i\u0000"}`), []string{"spec.cloud_init.instance_id"}},
		{"prepare", spec(`"network":{"type":"tap","bridge":"-help"}`), []string{"spec.network.bridge", "does not match"}},
		{"prepare", spec(`"network":{"type":"vnic","name":"-x"}`), []string{"spec.network.name"}},
		{"prepare", spec(`"network":{"type":"vnic","link":"--all"}`), []string{"spec.network.link"}},
	}
	for i, c := range cases {
		err := ValidateCommand(c.action, []byte(c.body))
		if err == nil {
			t.Errorf("%d: %s %.120q: no error", i, c.action, c.body)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%d: %s %.120q:\n  error %q\n  lacks %q", i, c.action, c.body, err, w)
			}
		}
		if len(err.Error()) > 600 {
			t.Errorf("%d: error is %d bytes long: %.200s", i, len(err.Error()), err)
		}
		if !errors.Is(err, api.ErrInvalid) {
			t.Errorf("%d: %v is not api.ErrInvalid", i, err)
		}
	}
}

func TestInvalidEvents(t *testing.T) {
	enc := func(mod func(*api.Event), ty api.EventType, a string) string {
		ev := eventOf(ty, a)
		mod(&ev)
		return string(ev.Encode())
	}
	none := func(*api.Event) {}
	cases := []struct {
		body string
		want []string
	}{
		{`{"vm":"web1"}`, []string{"type: is required"}},
		{`{"type":1}`, []string{"type: must be a string"}},
		{`{"type":"created","vm":"web1"}`, []string{"type", `unknown event type "created"`}},
		{`[]`, []string{"body: must be an object"}},
		{`{`, []string{"body is not valid JSON"}},
		{enc(func(e *api.Event) { e.Reason = "" }, api.TypeRejected, "start"), []string{"reason: is required"}},
		{enc(func(e *api.Event) { e.CommandID = "" }, api.TypeRejected, "start"), []string{"command_id: is required"}},
		{enc(func(e *api.Event) { e.State = "sleeping" }, api.TypeRejected, "start"), []string{"state"}},
		{enc(func(e *api.Event) { e.State = api.StateRunning }, api.TypeAccepted, "start"), []string{"state"}},
		{enc(func(e *api.Event) { e.State = api.StateStopping }, api.TypeAccepted, "start"), []string{`state: must be "starting" but found "stopping"`}},
		{enc(func(e *api.Event) { e.Host = "" }, api.TypeAccepted, "start"), []string{"host: is required"}},
		{enc(func(e *api.Event) { e.VM = "Web.1" }, api.TypeAccepted, "start"), []string{"vm"}},
		{enc(func(e *api.Event) { e.Action = "reboot" }, api.TypeAccepted, "start"), []string{"action"}},
		{enc(func(e *api.Event) { e.Handle = nil }, api.TypeStarted, "start"), []string{"handle: is required"}},
		{enc(func(e *api.Event) { e.Action = "stop" }, api.TypeStarted, "start"), []string{`action: must be "start"`}},
		{enc(func(e *api.Event) { e.Handle.ID = "" }, api.TypeStarted, "start"), []string{"handle.id"}},
		{enc(func(e *api.Event) { e.Handle.Backend = "xen" }, api.TypeStarted, "start"), []string{"handle.backend"}},
		{enc(func(e *api.Event) { e.Handle.Spec.Vcpus = 1000 }, api.TypeStarted, "start"), []string{"handle.spec.vcpus"}},
		{enc(func(e *api.Event) { e.Handle.Data = json.RawMessage(`"qmp.sock"`) }, api.TypeStarted, "start"), []string{"handle.data"}},
		{enc(func(e *api.Event) { e.Error = "" }, api.TypeFailed, "start"), []string{"error: is required"}},
		{enc(func(e *api.Event) { e.Handle.PID = 0 }, api.TypeExited, ""), []string{"handle.pid: is required"}},
		{enc(func(e *api.Event) { e.Reason = "" }, api.TypeExited, ""), []string{"reason: is required"}},
		{enc(func(e *api.Event) { e.Spec = &api.VmSpec{Vcpus: -1} }, api.TypeAccepted, "prepare"), []string{"spec.vcpus"}},
		{strings.Replace(enc(none, api.TypeStarted, "start"), `"time":"2025-03-14T15:09:26.535897932Z"`, `"time":"yesterday"`, 1), []string{`time: "yesterday" is not a valid date-time`}},
		{strings.Replace(enc(none, api.TypeStarted, "start"), `"time":"2025-03-14T15:09:26.535897932Z"`, `"time":"2025-03-14 15:09:26"`, 1), []string{"time"}},
		{strings.Replace(enc(none, api.TypeStarted, "start"), `{"type":"started",`, `{"type":"started","hostname":"x",`, 1), []string{`unknown field "hostname"`}},
	}
	for i, c := range cases {
		err := ValidateEvent([]byte(c.body))
		if err == nil {
			t.Errorf("%d: %.200s: no error", i, c.body)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%d: %.200s:\n  error %q\n  lacks %q", i, c.body, err, w)
			}
		}
	}
}

func TestInvalidOthers(t *testing.T) {
	for _, c := range []struct {
		name, body, want string
	}{
		{"nope", `{}`, `schema: unknown schema "nope"`},
		{"defs", `{}`, `unknown schema "defs"`},
		{"task", `{}`, "accepted_seq: is required"},
		{"task", `{"command_id":"c","vm":"v","action":"start","host":"h","accepted_seq":0}`, "accepted_seq: must be >= 1"},
		{"record", `{"name":"web1","state":"absent","generation":1,"last_seq":1,"last_event":"rejected"}`, "state"},
		{"record", `{"name":"web1","state":"running","generation":1,"last_seq":1,"last_event":"started","in_flight":[{"command_id":"c","action":"start"}]}`, "in_flight.0.seq: is required"},
		{"stats", `{"vm":"web1","host":"h1","backend":"qemu","state":"running","time":"2025-01-01T00:00:00Z","uptime_ms":1,"cpu_ns":1,"vcpus":[],"memory_bytes":1,"disks":[]}`, "rss_bytes: is required"},
		{"stats", `{"vm":"web1","host":"h1","backend":"qemu","state":"running","time":"2025-01-01T00:00:00Z","uptime_ms":1,"cpu_ns":-1,"vcpus":[],"memory_bytes":1,"rss_bytes":0,"disks":[]}`, "cpu_ns"},
		{"stats", `{"vm":"web1","host":"h1","backend":"qemu","state":"running","time":"2025-01-01T00:00:00Z","uptime_ms":1,"cpu_ns":1,"vcpus":[],"memory_bytes":1,"rss_bytes":0,"disks":[{"device":"vda","rd_bytes":1}]}`, "disks.0"},
		{"host", `{"host":"h1"}`, "backends: is required"},
		{"host", `{"host":"h1","version":"1","time":"2025-01-01T00:00:00Z","backends":["noop","xen"],"default_backend":"noop","capacity":{"vcpus":1,"memory_mb":1},"usage":{}}`, "backends.1"},
		{"host", `{"host":"h1","version":"1","time":"2025-01-01T00:00:00Z","backends":["noop"],"default_backend":"noop","capacity":{"vcpus":1,"memory_mb":1},"usage":{},"capabilities":{"xen":{}}}`, `capabilities: unknown field "xen"`},
		{"host", `{"host":"h1","version":"1","time":"2025-01-01T00:00:00Z","backends":["noop"],"default_backend":"noop","capacity":{"vcpus":1,"memory_mb":1},"usage":{"vms":-1}}`, "usage.vms"},
	} {
		err := Validate(c.name, []byte(c.body))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Validate(%s, %s) = %v, want it to contain %q", c.name, c.body, err, c.want)
		}
	}
}

func TestErrorShape(t *testing.T) {
	err := ValidateCommand("prepare", []byte(spec(`"vcpus":0,"memory_mb":1,"disk_gb":-1,"accel":"x","backend":"y"`)))
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("%T is not *Error", err)
	}
	if len(e.Causes) != maxCauses || e.More != 2 {
		t.Fatalf("causes %v, more %d", e.Causes, e.More)
	}
	want := `spec.accel: must be one of "auto", "kvm", "tcg" but found "x"; ` +
		`spec.backend: must be one of "noop", "qemu", "propolis" but found "y"; ` +
		`spec.disk_gb: must be >= 0 but found -1; and 2 more`
	if err.Error() != want {
		t.Fatalf("error\n  %s\nwant\n  %s", err, want)
	}
	// Stable: the same body gives the same message.
	for range 20 {
		if again := ValidateCommand("prepare", []byte(spec(`"vcpus":0,"memory_mb":1,"disk_gb":-1,"accel":"x","backend":"y"`))); again.Error() != want {
			t.Fatalf("unstable: %v", again)
		}
	}
	// Long values are cut short in messages.
	err = ValidateCommand("prepare", []byte(spec(`"name":"`+strings.Repeat("x", 5000)+`."`)))
	if len(err.Error()) > 400 {
		t.Fatalf("message not cut short: %d bytes", len(err.Error()))
	}
}

func TestConcurrentUse(t *testing.T) {
	good := mustJSON(t, api.Command{Spec: fullSpec()})
	ev := eventOf(api.TypeStarted, "start")
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 50 {
				if err := ValidateCommand("prepare", good); err != nil {
					t.Error(err)
				}
				if err := ValidateEvent(ev.Encode()); err != nil {
					t.Error(err)
				}
				if ValidateCommand("start", []byte(`{"host":"x"}`)) == nil {
					t.Error("host on start passed")
				}
			}
		})
	}
	wg.Wait()
}

// ---- fuzz --------------------------------------------------------------------

func isASCII(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

// FuzzValidateCommand: validation never panics, and a body it passes
// decodes into api.Command with the prepare-only fields only on prepare,
// and a spec Go's own validation also accepts.
func FuzzValidateCommand(f *testing.F) {
	f.Add("prepare", mustJSON(f, api.Command{CommandID: "c1", Spec: fullSpec(), TimeoutS: 30, Host: "h1"}))
	f.Add("prepare", []byte(spec(`"name":"web1","backend":"noop","network":{"type":"tap","bridge":"br0"}`)))
	f.Add("prepare", []byte(spec(`"vcpus":1e2,"vcpus":2`)))
	f.Add("start", []byte(`{}`))
	f.Add("stop", []byte(`{"command_id":"x","timeout_s":30}`))
	f.Add("destroy", []byte(`{"host":"h1"}`))
	f.Add("reboot", []byte(`{}`))
	f.Add("start", []byte(`[[[[{"a":[1,2,{"b":null}]}]]]]`))
	f.Add("start", []byte("\xff\xfe"))
	f.Fuzz(func(t *testing.T, action string, body []byte) {
		err := ValidateCommand(action, body)
		if err2 := ValidateCommand(action, body); (err == nil) != (err2 == nil) || (err != nil && err.Error() != err2.Error()) {
			t.Fatalf("not deterministic: %v / %v", err, err2)
		}
		if err != nil {
			if !errors.Is(err, api.ErrInvalid) {
				t.Fatalf("%v is not api.ErrInvalid", err)
			}
			return
		}
		var cmd api.Command
		if err := json.Unmarshal(body, &cmd); err != nil {
			t.Fatalf("schema passed %q but Go cannot decode it: %v", body, err)
		}
		if action != "prepare" {
			if cmd.Spec != nil || cmd.Host != "" {
				t.Fatalf("%s passed with spec or host: %q", action, body)
			}
			return
		}
		if cmd.Spec == nil {
			t.Fatalf("prepare passed without spec: %q", body)
		}
		s := *cmd.Spec
		if s.Name == "" {
			s.Name = "fuzz"
		}
		// Lengths: the schema counts characters, Go bytes; they agree on ASCII.
		if err := s.WithDefaults().Validate(); err != nil && isASCII(body) && !strings.Contains(string(body), `\u`) {
			t.Fatalf("schema passed %q but api.Validate says %v", body, err)
		}
		if cmd.Host != "" {
			if err := api.ValidateHost(cmd.Host); err != nil {
				t.Fatalf("schema passed host %q: %v", cmd.Host, err)
			}
		}
	})
}

// Escapes that make valid text pass: a surrogate pair, U+FFFD spelled as
// an escape in either case.
func TestValidEscapes(t *testing.T) {
	for _, body := range []string{
		`{"command_id":"smile\ud83d\ude00"}`,
		`{"command_id":"r\uFFFD\ufffd"}`,
		`{"command_id":"q\\ud800"}`, // an escaped backslash, then text
	} {
		if err := ValidateCommand("start", []byte(body)); err != nil {
			t.Errorf("%s: %v", body, err)
		}
	}
}

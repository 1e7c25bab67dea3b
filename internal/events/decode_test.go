package events

import (
	"encoding/json"
	"os"
	"reflect"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
)

// fill sets every field of the struct v points to (recursively) to a
// non-zero value, so an encoded event carries every key there is.
func fill(t *testing.T, v reflect.Value, depth int) {
	t.Helper()
	for i := range v.NumField() {
		f := v.Field(i)
		if v.Type() == reflect.TypeOf(api.Event{}) && (v.Type().Field(i).Name == "Migration" || v.Type().Field(i).Name == "Cancel") {
			// Only a migrate's events carry them, and decodeFast leaves
			// those to encoding/json (TestDecodeMigration).
			continue
		}
		switch f.Kind() {
		case reflect.String:
			f.SetString("x-" + v.Type().Field(i).Name + "\n\"é\"")
		case reflect.Int:
			f.SetInt(int64(7 + i))
		case reflect.Uint64:
			f.SetUint(uint64(1<<40 + i))
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Slice:
			// api.Event.Abandoned: only a forget carries it, and decodeFast
			// leaves such events to encoding/json (TestDecodeAbandoned).
			continue
		case reflect.Map:
			f.Set(reflect.ValueOf(map[string]string{"k": "v", "stop_path": "acpi"}))
		case reflect.Pointer:
			if depth > 3 {
				continue
			}
			p := reflect.New(f.Type().Elem())
			fill(t, p.Elem(), depth+1)
			f.Set(p)
		case reflect.Struct:
			if f.Type() == reflect.TypeOf(time.Time{}) {
				f.Set(reflect.ValueOf(time.Date(2026, 11, 28, 14, 43, 11, 123456789, time.UTC)))
				continue
			}
			fill(t, f, depth+1)
		default:
			t.Fatalf("fill: field %s has kind %s: teach fill and decodeFast about it", v.Type().Field(i).Name, f.Kind())
		}
	}
}

func viaJSON(t testing.TB, data []byte) (*api.Event, error) {
	t.Helper()
	var ev api.Event
	err := json.Unmarshal(data, &ev)
	return &ev, err
}

// The fast decoder takes every field vmherd writes: an event with all of
// them set decodes on the fast path, to what encoding/json decodes. A new
// field on api.Event, VmHandle or VmSpec fails this test until decodeFast
// knows it (until then such events fall back to encoding/json).
func TestDecodeFastKnowsEveryField(t *testing.T) {
	var ev api.Event
	fill(t, reflect.ValueOf(&ev).Elem(), 0)
	data := ev.Encode()
	fast, ok := decodeFast(data)
	if !ok {
		t.Fatalf("decodeFast refused an event vmherd writes:\n%s", data)
	}
	want, err := viaJSON(t, data)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(fast, want) {
		t.Fatalf("decodeFast differs from encoding/json:\nfast %+v\njson %+v", fast, want)
	}
}

// An event with abandoned commands (a forget) takes the encoding/json path
// and decodes whole.
func TestDecodeAbandoned(t *testing.T) {
	ev := api.Event{Type: api.TypeAccepted, VM: "web1", CommandID: "f1", Action: "destroy", Forget: true,
		Abandoned: []api.Abandoned{{CommandID: "c1", Action: "start", Seq: 9}}}
	data := ev.Encode()
	if _, ok := decodeFast(data); ok {
		t.Fatal("decodeFast took an event with abandoned commands")
	}
	got, err := Decode(data)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Abandoned, ev.Abandoned) || !got.Forget {
		t.Fatalf("decoded %+v, want %+v", got, ev)
	}
}

// A migrate's events (migration, cancel) take the encoding/json path and
// decode whole.
func TestDecodeMigration(t *testing.T) {
	for _, ev := range []api.Event{
		{Type: api.TypeMigrated, VM: "web1", CommandID: "m1", Action: "migrate", Host: "h2", State: api.StateRunning,
			Migration: &api.Migration{From: "h1", To: "h2", Mode: api.MigrateLive, Before: api.StateRunning, Bytes: 1 << 33, Total: 1 << 33, DowntimeMS: 12}},
		{Type: api.TypeAccepted, VM: "web1", CommandID: "c1", Action: "migrate", Cancel: true, State: api.StateRunning,
			Abandoned: []api.Abandoned{{CommandID: "m1", Action: "migrate", Seq: 9}}, Migration: &api.Migration{From: "h1", To: "h2", Mode: api.MigrateLive, Before: api.StateRunning}},
	} {
		data := ev.Encode()
		if _, ok := decodeFast(data); ok {
			t.Fatalf("decodeFast took a migrate's event: %s", data)
		}
		got, err := Decode(data)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(*got, ev) {
			t.Fatalf("decoded %+v, want %+v", got, ev)
		}
	}
}

func seeds() [][]byte {
	spec := api.VmSpec{Name: "web1", Backend: api.BackendQEMU, ImagePath: "/img/base.qcow2", Vcpus: 2, MemoryMB: 2048,
		CloudInit: &api.CloudInitConfig{UserData: "#cloud-config\nhostname: web1\n"}}.WithDefaults()
	h := &api.VmHandle{ID: "0123456789abcdef", Name: "web1", Backend: api.BackendQEMU, Host: "h1", PID: 4242,
		Spec: &spec, StartedAt: time.Now().UTC(),
		Data: json.RawMessage(`{"qmp_socket":"/v/web1/qmp.sock","ssh_port":2222,"extra":{"stop_path":"acpi"}}`)}
	now := time.Now().UTC()
	evs := []api.Event{
		{Type: api.TypeAccepted, VM: "web1", CommandID: "c1", Action: "prepare", Time: now, Host: "h1", State: api.StatePreparing, Backend: api.BackendQEMU, Spec: &spec, TimeoutS: 30},
		{Type: api.TypePrepared, VM: "web1", CommandID: "c1", Action: "prepare", Time: now, Host: "h1", State: api.StatePrepared, Handle: h, AcceptedSeq: 17},
		{Type: api.TypeRejected, VM: "web1", CommandID: "c2", Action: "suspend", Time: now, State: api.StatePrepared, Reason: "cannot suspend: vm is \"prepared\""},
		{Type: api.TypeFailed, VM: "web1", CommandID: "c3", Action: "start", Time: now, Host: "h1", State: api.StateFailed, Handle: h, Error: "start vm web1 on host h1: boom"},
		{Type: api.TypeExited, VM: "web1", Time: now, Host: "h1", State: api.StateStopped, Handle: h, Reason: "found not running by reconciliation"},
	}
	var out [][]byte
	for _, ev := range evs {
		out = append(out, ev.Encode())
	}
	return append(out,
		[]byte(`{"type":"started","vm":"a","time":"2026-11-28T14:43:11Z"}`),
		[]byte(` { "type" : "started" , "vm" : "a" , "accepted_seq" : 0 } `),
		[]byte(`{"type":"started","vm":"a","Vm":"b"}`),
		[]byte(`{"type":"started","vm":"a","vm":"b"}`),
		[]byte(`{"type":"started","vm":"a","handle":{"id":"x"},"handle":{"pid":3}}`),
		[]byte(`{"type":"started","vm":"a","handle":null}`),
		[]byte(`{"type":"started","vm":"a\u00e9"}`),
		[]byte(`{"type":"started","vm":"a\ud800"}`),
		[]byte("{\"type\":\"started\",\"vm\":\"\xff\"}"),
		[]byte(`{"type":"started","vm":"a","timeout_s":1.5}`),
		[]byte(`{"type":"started","vm":"a","timeout_s":-0}`),
		[]byte(`{"type":"started","vm":"a","timeout_s":012}`),
		[]byte(`{"type":"started","vm":"a","accepted_seq":-1}`),
		[]byte(`{"type":"started","vm":"a","accepted_seq":99999999999999999999}`),
		[]byte(`{"type":"started","vm":"a","time":"not a time"}`),
		[]byte(`{"type":"started","vm":"a","spec":{"uefi":true,"network":{"type":"tap","bridge":"br0"}}}`),
		[]byte(`{"type":"started","vm":"a"} x`),
		[]byte(`{"type":"started","vm":"a",}`),
		[]byte(`{"type":"started","vm":"a","unknown":1}`),
		[]byte("{\"type\":\"started\",\"vm\":\"a\",\"handle\":{\"extra\":{\"\xff\":\"v\",\"k\":\"1\",\"k\":\"2\"}}}"),
		[]byte("{\"type\":\"started\",\"vm\":\"a\",\"handle\":{\"data\":{\"\xff\":\"v\",\"k\":\"1\",\"k\":\"2\"}}}"),
		[]byte(`{"type":"started","vm":"a","handle":{"data":{ "k" : {"n":-1,"b":true,"s":"x\ty"} , "e":{}}}}`),
		[]byte(`{"type":"started","vm":"a","handle":{"data":{"f":1.5}}}`),
		[]byte(`{"type":"started","vm":"a","handle":{"data":{"a":[1]}}}`),
		[]byte(`{"type":"started","vm":"a","handle":{"data":null}}`),
		[]byte(`{"type":"started","vm":"a","handle":{"data":"x"}}`),
		[]byte(`{"type":"started","vm":"a","handle":{"data":{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}}}}`),
		[]byte(`{"type":"started","vm":"a","handle":{"id":"x","qmp_socket":"/q","ssh_port":22}}`),
		[]byte(`{}`),
		[]byte(`null`),
	)
}

func TestDecodeFastSeeds(t *testing.T) {
	for _, data := range seeds()[:5] {
		if _, ok := decodeFast(data); !ok {
			t.Errorf("decodeFast refused an event vmherd writes:\n%s", data)
		}
	}
	for _, data := range seeds() {
		checkDecodeFast(t, data)
	}
}

// checkDecodeFast: whatever decodeFast accepts, encoding/json decodes to
// the same event.
func checkDecodeFast(t *testing.T, data []byte) {
	t.Helper()
	fast, ok := decodeFast(data)
	if !ok {
		return
	}
	want, err := viaJSON(t, data)
	if err != nil {
		t.Fatalf("decodeFast accepted what encoding/json rejects (%v):\n%q", err, data)
	}
	if !reflect.DeepEqual(fast, want) {
		t.Fatalf("decodeFast differs from encoding/json on %q:\nfast %+v\njson %+v", data, fast, want)
	}
}

func FuzzDecodeFast(f *testing.F) {
	for _, s := range seeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkDecodeFast(t, data)
	})
}

func BenchmarkDecode(b *testing.B) {
	data := seeds()[1]
	b.SetBytes(int64(len(data)))
	b.Run("fast", func(b *testing.B) {
		for b.Loop() {
			if _, err := Decode(data); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		for b.Loop() {
			if _, err := viaJSON(b, data); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// An event stored before handles had Data (its handle's backend fields at
// the top) takes the encoding/json path and decodes with them as Data.
func TestDecodeLegacyHandle(t *testing.T) {
	raw, err := os.ReadFile("../../api/testdata/handle-qemu-legacy.json")
	if err != nil {
		t.Fatal(err)
	}
	data := []byte(`{"type":"started","vm":"web1","command_id":"c1","action":"start","time":"2026-12-01T10:00:00Z","host":"h1","handle":` + string(raw) + `,"accepted_seq":7}`)
	if _, ok := decodeFast(data); ok {
		t.Fatal("decodeFast took a handle of the old form")
	}
	ev, err := Decode(data)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		QMPSocket string `json:"qmp_socket"`
		SSHPort   int    `json:"ssh_port"`
	}
	if ev.Handle == nil || json.Unmarshal(ev.Handle.Data, &d) != nil || d.SSHPort != 40022 || d.QMPSocket == "" || ev.Handle.PID != 4242 {
		t.Fatalf("decoded handle %+v", ev.Handle)
	}
	// Encoded again, it is in the new form, which decodeFast takes.
	if again, ok := decodeFast(ev.Encode()); !ok || !reflect.DeepEqual(again, ev) {
		t.Fatalf("re-encoded: fast %v\n%+v\n%+v", ok, again, ev)
	}
}

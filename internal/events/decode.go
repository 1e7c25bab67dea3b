package events

import (
	"encoding/json"
	"strconv"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
)

// stdlibOnly makes Decode use encoding/json alone (UseStdlibDecoder).
var stdlibOnly atomic.Bool

// UseStdlibDecoder switches Decode to encoding/json alone (on) or back to
// decodeFast with encoding/json as its fallback (off). It exists for the
// benchmark, which measures the projection's replay and rebuild with both
// in one run: decodeFast stays only while that shows it is needed.
func UseStdlibDecoder(on bool) { stdlibOnly.Store(on) }

// decodeFast decodes an event body the way encoding/json.Unmarshal into an
// api.Event would, for the bodies vmherd itself writes: an object of known
// keys, each at most once, exactly as the struct tags spell them; strings
// with only simple escapes; integers; no nulls. On anything else it
// reports false and the caller uses encoding/json, so the two always agree
// (FuzzDecodeFast checks it). The projection decodes every event it folds;
// this is several times faster than reflection.
func decodeFast(data []byte) (*api.Event, bool) {
	s := scanner{b: data}
	ev := &api.Event{}
	if !s.event(ev) || !s.end() {
		return nil, false
	}
	return ev, true
}

// Each decoder below reads one object. A key it does not know, or a key
// given twice (encoding/json merges repeated objects), makes it fail.

func (s *scanner) event(ev *api.Event) bool {
	var seen uint32
	more, ok := s.open()
	for ; ok && more; more, ok = s.after() {
		key, ok := s.key()
		if !ok {
			return false
		}
		var bit uint32
		switch string(key) {
		case "type":
			bit, ok = 1<<0, s.enumInto((*string)(&ev.Type))
		case "vm":
			bit, ok = 1<<1, s.strInto(&ev.VM)
		case "command_id":
			bit, ok = 1<<2, s.strInto(&ev.CommandID)
		case "action":
			bit, ok = 1<<3, s.enumInto((*string)(&ev.Action))
		case "time":
			bit, ok = 1<<4, s.time(&ev.Time)
		case "host":
			bit, ok = 1<<5, s.strInto(&ev.Host)
		case "state":
			bit, ok = 1<<6, s.enumInto((*string)(&ev.State))
		case "handle":
			ev.Handle = &api.VmHandle{}
			bit, ok = 1<<7, s.handle(ev.Handle)
		case "reason":
			bit, ok = 1<<8, s.strInto(&ev.Reason)
		case "error":
			bit, ok = 1<<9, s.strInto(&ev.Error)
		case "backend":
			bit, ok = 1<<10, s.enumInto((*string)(&ev.Backend))
		case "spec":
			ev.Spec = &api.VmSpec{}
			bit, ok = 1<<11, s.spec(ev.Spec)
		case "timeout_s":
			bit, ok = 1<<12, s.intInto(&ev.TimeoutS)
		case "accepted_seq":
			bit, ok = 1<<13, s.uintInto(&ev.AcceptedSeq)
		case "forget":
			bit, ok = 1<<14, s.boolInto(&ev.Forget)
		case "issuer":
			bit, ok = 1<<15, s.strInto(&ev.Issuer)
			// "abandoned" (a forget's list, rare) is left to encoding/json.
		}
		if !ok || !once(&seen, bit) {
			return false
		}
	}
	return ok
}

func (s *scanner) handle(h *api.VmHandle) bool {
	var seen uint32
	more, ok := s.open()
	for ; ok && more; more, ok = s.after() {
		key, ok := s.key()
		if !ok {
			return false
		}
		var bit uint32
		switch string(key) {
		case "id":
			bit, ok = 1<<0, s.strInto(&h.ID)
		case "name":
			bit, ok = 1<<1, s.strInto(&h.Name)
		case "backend":
			bit, ok = 1<<2, s.enumInto((*string)(&h.Backend))
		case "host":
			bit, ok = 1<<3, s.strInto(&h.Host)
		case "pid":
			bit, ok = 1<<4, s.intInto(&h.PID)
		case "work_dir":
			bit, ok = 1<<5, s.strInto(&h.WorkDir)
		case "spec":
			h.Spec = &api.VmSpec{}
			bit, ok = 1<<6, s.spec(h.Spec)
		case "started_at":
			bit, ok = 1<<7, s.time(&h.StartedAt)
		case "data":
			bit, ok = 1<<8, s.rawObject(&h.Data)
			// The backend fields of handles stored before Data (accel,
			// qmp_socket, ...) are unknown keys: encoding/json decodes
			// those handles, with VmHandle.UnmarshalJSON.
		}
		if !ok || !once(&seen, bit) {
			return false
		}
	}
	return ok
}

func (s *scanner) spec(sp *api.VmSpec) bool {
	var seen uint32
	more, ok := s.open()
	for ; ok && more; more, ok = s.after() {
		key, ok := s.key()
		if !ok {
			return false
		}
		var bit uint32
		switch string(key) {
		case "name":
			bit, ok = 1<<0, s.strInto(&sp.Name)
		case "backend":
			bit, ok = 1<<1, s.enumInto((*string)(&sp.Backend))
		case "image_path":
			bit, ok = 1<<2, s.strInto(&sp.ImagePath)
		case "vcpus":
			bit, ok = 1<<3, s.intInto(&sp.Vcpus)
		case "memory_mb":
			bit, ok = 1<<4, s.intInto(&sp.MemoryMB)
		case "disk_gb":
			bit, ok = 1<<5, s.intInto(&sp.DiskGB)
		case "uefi":
			bit, ok = 1<<6, s.boolInto(&sp.UEFI)
		case "network":
			sp.Network = &api.NetworkConfig{}
			bit, ok = 1<<7, s.network(sp.Network)
		case "cloud_init":
			sp.CloudInit = &api.CloudInitConfig{}
			bit, ok = 1<<8, s.cloudInit(sp.CloudInit)
		case "ssh":
			sp.SSH = &api.SshConfig{}
			bit, ok = 1<<9, s.ssh(sp.SSH)
		case "accel":
			bit, ok = 1<<10, s.enumInto(&sp.Accel)
		case "image":
			bit, ok = 1<<11, s.strInto(&sp.Image)
		case "labels":
			bit, ok = 1<<12, s.stringMap(&sp.Labels)
		}
		if !ok || !once(&seen, bit) {
			return false
		}
	}
	return ok
}

func (s *scanner) network(n *api.NetworkConfig) bool {
	return s.strFields(func(key []byte) (uint32, *string) {
		switch string(key) {
		case "type":
			return 1 << 0, (*string)(&n.Type)
		case "bridge":
			return 1 << 1, &n.Bridge
		case "name":
			return 1 << 2, &n.Name
		case "link":
			return 1 << 3, &n.Link
		}
		return 0, nil
	})
}

func (s *scanner) cloudInit(c *api.CloudInitConfig) bool {
	return s.strFields(func(key []byte) (uint32, *string) {
		switch string(key) {
		case "user_data":
			return 1 << 0, &c.UserData
		case "network_config":
			return 1 << 1, &c.NetworkConfig
		case "instance_id":
			return 1 << 2, &c.InstanceID
		case "hostname":
			return 1 << 3, &c.Hostname
		}
		return 0, nil
	})
}

func (s *scanner) ssh(c *api.SshConfig) bool {
	return s.strFields(func(key []byte) (uint32, *string) {
		switch string(key) {
		case "user":
			return 1 << 0, &c.User
		case "public_key":
			return 1 << 1, &c.PublicKey
		}
		return 0, nil
	})
}

// strFields reads an object whose fields are all strings; field names the
// bit and destination of a key (0, nil: unknown).
func (s *scanner) strFields(field func(key []byte) (uint32, *string)) bool {
	var seen uint32
	more, ok := s.open()
	for ; ok && more; more, ok = s.after() {
		key, ok := s.key()
		if !ok {
			return false
		}
		bit, p := field(key)
		if p == nil || !once(&seen, bit) || !s.strInto(p) {
			return false
		}
	}
	return ok
}

// stringMap reads an object of strings (labels).
func (s *scanner) stringMap(m *map[string]string) bool {
	out := map[string]string{}
	*m = out
	more, ok := s.open()
	for ; ok && more; more, ok = s.after() {
		key, ok := s.key()
		if !ok || !utf8.Valid(key) {
			return false
		}
		v, ok := s.str()
		if !ok {
			return false
		}
		out[string(key)] = v // a repeated key: the last one wins, as in encoding/json
	}
	return ok
}

// maxRawDepth bounds the nesting rawObject accepts.
const maxRawDepth = 8

// rawObject reads an object of the values this scanner knows (strings,
// integers, booleans, objects) and keeps it as written, as encoding/json
// does for a json.RawMessage.
func (s *scanner) rawObject(p *json.RawMessage) bool {
	s.ws()
	start := s.i
	if !s.skipObject(0) {
		return false
	}
	*p = append(json.RawMessage(nil), s.b[start:s.i]...)
	return true
}

func (s *scanner) skipObject(depth int) bool {
	if depth >= maxRawDepth {
		return false
	}
	more, ok := s.open()
	for ; ok && more; more, ok = s.after() {
		if _, ok := s.key(); !ok || !s.skipValue(depth) {
			return false
		}
	}
	return ok
}

func (s *scanner) skipValue(depth int) bool {
	s.ws()
	if s.i >= len(s.b) {
		return false
	}
	switch c := s.b[s.i]; {
	case c == '{':
		return s.skipObject(depth + 1)
	case c == '"':
		_, ok := s.str()
		return ok
	case c == 't' || c == 'f':
		var b bool
		return s.boolInto(&b)
	default:
		_, ok := s.number()
		return ok
	}
}

// once marks bit seen and reports whether it was not seen before (bit 0:
// an unknown key, never accepted).
func once(seen *uint32, bit uint32) bool {
	if bit == 0 || *seen&bit != 0 {
		return false
	}
	*seen |= bit
	return true
}

// scanner reads the JSON subset decodeFast accepts.
type scanner struct {
	b []byte
	i int
}

func (s *scanner) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *scanner) next(c byte) bool {
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

func (s *scanner) peek(c byte) bool {
	s.ws()
	return s.i < len(s.b) && s.b[s.i] == c
}

// end reports whether only whitespace is left.
func (s *scanner) end() bool {
	s.ws()
	return s.i == len(s.b)
}

// open reads the '{' of an object and reports whether a key follows.
func (s *scanner) open() (more, ok bool) {
	if !s.next('{') {
		return false, false
	}
	return !s.next('}'), true
}

// after reads what follows a value in an object: ',' and more, or '}'.
func (s *scanner) after() (more, ok bool) {
	if s.next(',') {
		return true, true
	}
	return false, s.next('}')
}

// key reads a key and its ':'. Keys are compared as written: one with an
// escape is not a key vmherd writes.
func (s *scanner) key() ([]byte, bool) {
	if !s.next('"') {
		return nil, false
	}
	start := s.i
	for s.i < len(s.b) {
		switch c := s.b[s.i]; {
		case c == '"':
			k := s.b[start:s.i]
			s.i++
			return k, s.next(':')
		case c == '\\' || c < 0x20:
			return nil, false
		}
		s.i++
	}
	return nil, false
}

// str reads a string with at most the escapes \" \\ \/ \b \f \n \r \t, of
// valid UTF-8 and without control characters.
func (s *scanner) str() (string, bool) {
	raw, escaped, ok := s.strBytes()
	switch {
	case !ok:
		return "", false
	case escaped:
		return unescape(raw)
	case !utf8.Valid(raw):
		return "", false
	}
	return string(raw), true
}

// strBytes reads a string and returns it as written between the quotes.
func (s *scanner) strBytes() (raw []byte, escaped, ok bool) {
	if !s.next('"') {
		return nil, false, false
	}
	start := s.i
	for s.i < len(s.b) {
		c := s.b[s.i]
		switch {
		case c == '"':
			raw = s.b[start:s.i]
			s.i++
			return raw, escaped, true
		case c == '\\':
			escaped = true
			s.i += 2
		case c < 0x20:
			return nil, false, false
		default:
			s.i++
		}
	}
	return nil, false, false
}

// common are the values of the enumerated fields (event types, states,
// actions, backends): decoding them takes no allocation.
var common = func() map[string]string {
	m := map[string]string{}
	for _, t := range api.EventTypes {
		m[string(t)] = string(t)
	}
	for _, a := range fsm.Actions {
		m[string(a)] = string(a)
	}
	for _, st := range fsm.States() {
		m[string(st)] = string(st)
	}
	for _, b := range api.Backends {
		m[string(b)] = string(b)
	}
	for _, v := range []string{string(fsm.StateAbsent), "user", "tap", "vnic", "none", "kvm", "tcg"} {
		m[v] = v
	}
	return m
}()

// enumInto reads a string that is usually one of the common values.
func (s *scanner) enumInto(p *string) bool {
	raw, escaped, ok := s.strBytes()
	if ok && !escaped {
		if v, found := common[string(raw)]; found {
			*p = v
			return true
		}
	}
	if !ok {
		return false
	}
	if escaped {
		v, ok := unescape(raw)
		*p = v
		return ok
	}
	if !utf8.Valid(raw) {
		return false
	}
	*p = string(raw)
	return true
}

func unescape(raw []byte) (string, bool) {
	out := make([]byte, 0, len(raw))
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if c != '\\' {
			out = append(out, c)
			continue
		}
		i++
		if i >= len(raw) {
			return "", false
		}
		switch raw[i] {
		case '"', '\\', '/':
			out = append(out, raw[i])
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		default:
			return "", false // \u and anything else: leave it to encoding/json
		}
	}
	if !utf8.Valid(out) {
		return "", false
	}
	return string(out), true
}

func (s *scanner) strInto(p *string) bool {
	v, ok := s.str()
	*p = v
	return ok
}

// number reads an integer: an optional minus and digits, no leading zero,
// fraction or exponent.
func (s *scanner) number() ([]byte, bool) {
	s.ws()
	start := s.i
	if s.i < len(s.b) && s.b[s.i] == '-' {
		s.i++
	}
	digits := s.i
	for s.i < len(s.b) && s.b[s.i] >= '0' && s.b[s.i] <= '9' {
		s.i++
	}
	n := s.i - digits
	if n == 0 || n > 1 && s.b[digits] == '0' {
		return nil, false
	}
	if s.i < len(s.b) {
		switch s.b[s.i] {
		case '.', 'e', 'E':
			return nil, false
		}
	}
	return s.b[start:s.i], true
}

func (s *scanner) intInto(p *int) bool {
	b, ok := s.number()
	if !ok {
		return false
	}
	n, err := strconv.ParseInt(string(b), 10, strconv.IntSize)
	*p = int(n)
	return err == nil
}

func (s *scanner) uintInto(p *uint64) bool {
	b, ok := s.number()
	if !ok || b[0] == '-' {
		return false
	}
	n, err := strconv.ParseUint(string(b), 10, 64)
	*p = n
	return err == nil
}

func (s *scanner) boolInto(p *bool) bool {
	s.ws()
	switch {
	case hasPrefixAt(s.b, s.i, "true"):
		s.i += 4
		*p = true
		return true
	case hasPrefixAt(s.b, s.i, "false"):
		s.i += 5
		*p = false
		return true
	}
	return false
}

func hasPrefixAt(b []byte, i int, p string) bool {
	return len(b)-i >= len(p) && string(b[i:i+len(p)]) == p
}

// time reads a string with time.Time's own JSON decoding, as encoding/json
// calls it.
func (s *scanner) time(t *time.Time) bool {
	if !s.peek('"') {
		return false
	}
	start := s.i
	if _, ok := s.str(); !ok {
		return false
	}
	return t.UnmarshalJSON(s.b[start:s.i]) == nil
}

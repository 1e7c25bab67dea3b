// Package schemas holds the JSON Schemas (draft 2020-12) of vmherd's wire
// contract: every command body, every event body, the task, the VM record and
// the host heartbeat. The *.json files next to this one are the contract
// (each has $id https://vmherd.dev/schemas/<file>; defs.json holds the shared
// definitions); this package embeds them, compiles them once and validates
// bodies against them with short, human error messages that name the field
// and the rule it broke, e.g.
//
//	spec.vcpus: must be <= 255 but found 1000
//	spec: unknown field "foo"
//	host: is only allowed on prepare
//
// Commands are user input and are checked strictly: unknown fields,
// duplicate fields and non-integer number literals (2.0, 1e3) are errors, so
// a body that passes decodes into api.Command with exactly the values
// that were checked. DecodeCommand parses a command's body once: the
// checked document itself fills the Go value. Handles and host heartbeats
// are open to unknown fields (old readers ignore what newer writers add).
package schemas

import (
	"bytes"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/vmherd/vmherd/api"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/santhosh-tekuri/jsonschema/v6/kind"
	"golang.org/x/text/language"
	"golang.org/x/text/message"

	"github.com/vmherd/vmherd/internal/fsm"
)

//go:embed *.json
var files embed.FS

// BaseURL prefixes every schema's file name to make its $id.
const BaseURL = "https://vmherd.dev/schemas/"

// MaxBodySize is the largest body validated; larger ones are rejected before
// they are parsed. It is also NATS' default max_payload.
const MaxBodySize = 1 << 20

// maxCauses caps how many causes an error lists.
const maxCauses = 3

// maxDepth caps how deeply a body may nest arrays and objects (the deepest
// valid body nests 4 levels).
const maxDepth = 32

// defsFile is not a body schema: it only holds shared definitions.
const defsFile = "defs.json"

var (
	once     sync.Once
	compiled map[string]*jsonschema.Schema // by name: "command.start", "task", ...
	names    []string                      // sorted keys of compiled
)

// load compiles every embedded schema. A schema that does not compile is a
// programmer error: it panics (and the package's tests catch it).
func load() {
	once.Do(func() {
		c, list, err := compileAll()
		if err != nil {
			panic("schemas: " + err.Error())
		}
		compiled, names = c, list
	})
}

func compileAll() (map[string]*jsonschema.Schema, []string, error) {
	entries, err := fs.ReadDir(files, ".")
	if err != nil {
		return nil, nil, err
	}
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft2020)
	c.AssertFormat()
	var list []string
	for _, e := range entries {
		file := e.Name()
		data, err := files.ReadFile(file)
		if err != nil {
			return nil, nil, err
		}
		doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", file, err)
		}
		obj, _ := doc.(map[string]any)
		if id, _ := obj["$id"].(string); id != BaseURL+file {
			return nil, nil, fmt.Errorf("%s: $id is %q, want %q", file, id, BaseURL+file)
		}
		if err := c.AddResource(BaseURL+file, doc); err != nil {
			return nil, nil, fmt.Errorf("%s: %w", file, err)
		}
		if file != defsFile {
			list = append(list, strings.TrimSuffix(file, ".json"))
		}
	}
	out := make(map[string]*jsonschema.Schema, len(list))
	for _, name := range list {
		sch, err := c.Compile(BaseURL + name + ".json")
		if err != nil {
			return nil, nil, fmt.Errorf("compiling %s.json: %w", name, err)
		}
		out[name] = sch
	}
	sort.Strings(list)
	return out, list, nil
}

// Names lists the schemas Validate knows, sorted: "command.destroy", ...,
// "event.accepted", ..., "host", "record", "task".
func Names() []string {
	load()
	return slices.Clone(names)
}

// actions are the command actions and eventTypes the event types, as the
// state machine (fsm) and events define them; the schema files' enums are
// checked against them by a test.
var (
	actions    = strs(fsm.Actions)
	eventTypes = strs(api.EventTypes)
)

func strs[T ~string](vs []T) []string {
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = string(v)
	}
	return out
}

// ValidateCommand checks the body of a command on vm.cmd.<vm>.<action>.
func ValidateCommand(action string, body []byte) error {
	_, err := checkCommand(action, body)
	return err
}

// DecodeCommand checks the body of a command on vm.cmd.<vm>.<action> and,
// if it passes, fills into (a pointer to a struct whose json tags are the
// schema's properties, api.Command) from the checked document, so the
// body is parsed once. The document's numbers are integer literals (the
// parse refuses others) and its fields are the schema's (it refuses
// unknown ones), so filling cannot fail on a body that passed.
func DecodeCommand(action string, body []byte, into any) error {
	doc, err := checkCommand(action, body)
	if err != nil {
		return err
	}
	if err := fill(reflect.ValueOf(into).Elem(), doc); err != nil {
		return one("body", err.Error())
	}
	return nil
}

func checkCommand(action string, body []byte) (any, error) {
	if !slices.Contains(actions, action) {
		return nil, one("action", fmt.Sprintf("unknown action %s (valid: %s)", quote(action), strings.Join(actions, ", ")))
	}
	return checked("command."+action, body)
}

// ValidateEvent checks an event body against the schema of its "type".
func ValidateEvent(body []byte) error {
	load()
	if err := checkSize(body); err != nil {
		return err
	}
	doc, err := parse(body, false)
	if err != nil {
		return err
	}
	obj, ok := doc.(map[string]any)
	if !ok {
		return one("body", "must be an object, not "+article(typeName(doc)))
	}
	t, present := obj["type"]
	s, isString := t.(string)
	switch {
	case !present:
		return one("type", "is required")
	case !isString:
		return one("type", "must be a string, not "+article(typeName(t)))
	case !slices.Contains(eventTypes, s):
		return one("type", fmt.Sprintf("unknown event type %s (valid: %s)", quote(s), strings.Join(eventTypes, ", ")))
	}
	return check("event."+s, doc)
}

// Validate checks body against the schema called name (see Names).
func Validate(name string, body []byte) error {
	_, err := checked(name, body)
	return err
}

// checked parses body and checks it against the schema called name,
// returning the document that passed.
func checked(name string, body []byte) (any, error) {
	load()
	if _, ok := compiled[name]; !ok {
		return nil, one("schema", fmt.Sprintf("unknown schema %s (valid: %s)", quote(name), strings.Join(names, ", ")))
	}
	if err := checkSize(body); err != nil {
		return nil, err
	}
	doc, err := parse(body, strings.HasPrefix(name, "command."))
	if err != nil {
		return nil, err
	}
	if err := check(name, doc); err != nil {
		return nil, err
	}
	return doc, nil
}

func check(name string, doc any) error {
	err := compiled[name].Validate(doc)
	if err == nil {
		return nil
	}
	var ve *jsonschema.ValidationError
	if !errors.As(err, &ve) {
		return one("body", err.Error())
	}
	return flatten(name, doc, ve)
}

// Error is a body that broke its schema.
type Error struct {
	// Causes are the most specific things wrong with the body, in the order
	// of their fields, at most 3.
	Causes []Cause
	// More counts the causes left out.
	More int
}

// Cause is one broken rule. Field is a dotted path into the body ("body"
// for the body itself, "" when the rule is about the bytes).
type Cause struct {
	Field string
	Rule  string
}

func (c Cause) String() string {
	if c.Field == "" {
		return c.Rule
	}
	return c.Field + ": " + c.Rule
}

func (e *Error) Error() string {
	parts := make([]string, 0, len(e.Causes)+1)
	for _, c := range e.Causes {
		parts = append(parts, c.String())
	}
	if e.More > 0 {
		parts = append(parts, fmt.Sprintf("and %d more", e.More))
	}
	return strings.Join(parts, "; ")
}

// Unwrap makes every validation error an api.ErrInvalid, like api.FieldError.
func (e *Error) Unwrap() error { return api.ErrInvalid }

func one(field, rule string) *Error { return &Error{Causes: []Cause{{Field: field, Rule: rule}}} }

func checkSize(body []byte) error {
	if len(body) > MaxBodySize {
		return one("body", fmt.Sprintf("%d bytes is too large (at most %d)", len(body), MaxBodySize))
	}
	return nil
}

// parse decodes body into the generic form the validator takes (maps,
// slices, json.Number, strings, bools, nil). Unlike encoding/json, a field
// given twice is an error: the schema would check only the last one while
// encoding/json merges both into a struct. With intsOnly, a number literal
// must be an integer literal (2, not 2.0 or 2e0): every number in a command
// is a Go int, which encoding/json does not fill from those. A string
// holding invalid UTF-8 or a lone surrogate escape (\ud800) is an error
// naming its field: encoding/json would silently turn it into U+FFFD.
func parse(body []byte, intsOnly bool) (any, error) {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, one("", "body is not valid JSON: it is empty (send {} for a command with no options)")
	}
	p := parser{dec: json.NewDecoder(bytes.NewReader(body)), intsOnly: intsOnly, body: body}
	p.dec.UseNumber()
	v, err := p.value(nil, 0)
	if err != nil {
		return nil, err
	}
	if _, err := p.dec.Token(); err != io.EOF {
		return nil, one("", "body is not valid JSON: unexpected data after the top-level value")
	}
	return v, nil
}

type parser struct {
	dec      *json.Decoder
	intsOnly bool
	body     []byte
}

// checkString reports a string token (the bytes body[start:end]: the
// literal and what precedes it since the last token) that encoding/json
// decoded with a replacement: invalid UTF-8 or a lone surrogate escape.
// A U+FFFD the body spells itself (as UTF-8 or \ufffd) is kept.
func (p *parser) checkString(path []string, s string, start, end int64) error {
	if !strings.ContainsRune(s, utf8.RuneError) {
		return nil
	}
	if !validJSONString(p.body[max(start, 0):min(end, int64(len(p.body)))]) {
		return one(fieldPath(path), "is not valid UTF-8 (invalid bytes or a lone surrogate escape); send UTF-8 text")
	}
	return nil
}

// validJSONString reports whether a JSON string literal (which the
// decoder accepted) is valid UTF-8 and pairs every surrogate escape.
func validJSONString(raw []byte) bool {
	if !utf8.Valid(raw) {
		return false
	}
	hex4 := func(b []byte) rune {
		r, err := strconv.ParseUint(string(b), 16, 32)
		if err != nil {
			return -1
		}
		return rune(r)
	}
	for i := 0; i < len(raw); i++ {
		if raw[i] != '\\' {
			continue
		}
		i++
		if i >= len(raw) || raw[i] != 'u' || i+4 >= len(raw) {
			continue
		}
		r := hex4(raw[i+1 : i+5])
		i += 4
		switch {
		case r >= 0xd800 && r < 0xdc00: // high: a low one must follow
			if i+6 < len(raw) && raw[i+1] == '\\' && raw[i+2] == 'u' {
				if lo := hex4(raw[i+3 : i+7]); lo >= 0xdc00 && lo < 0xe000 {
					i += 6
					continue
				}
			}
			return false
		case r >= 0xdc00 && r < 0xe000:
			return false
		}
	}
	return true
}

func (p *parser) token() (json.Token, error) {
	t, err := p.dec.Token()
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		msg := err.Error()
		var se *json.SyntaxError
		if errors.As(err, &se) {
			msg = fmt.Sprintf("%s (at byte %d)", msg, se.Offset)
		}
		return nil, one("", "body is not valid JSON: "+msg)
	}
	return t, nil
}

func (p *parser) value(path []string, depth int) (any, error) {
	start := p.dec.InputOffset()
	t, err := p.token()
	if err != nil {
		return nil, err
	}
	switch t := t.(type) {
	case string:
		if err := p.checkString(path, t, start, p.dec.InputOffset()); err != nil {
			return nil, err
		}
		return t, nil
	case json.Delim:
		if depth >= maxDepth {
			return nil, one(fieldPath(path), fmt.Sprintf("nests more than %d levels deep", maxDepth))
		}
		if t == '[' {
			arr := []any{}
			for p.dec.More() {
				v, err := p.value(append(path, strconv.Itoa(len(arr))), depth+1)
				if err != nil {
					return nil, err
				}
				arr = append(arr, v)
			}
			_, err := p.token() // ']'
			return arr, err
		}
		obj := map[string]any{}
		for p.dec.More() {
			kstart := p.dec.InputOffset()
			kt, err := p.token()
			if err != nil {
				return nil, err
			}
			k, _ := kt.(string) // json.Decoder only returns string keys
			if err := p.checkString(path, k, kstart, p.dec.InputOffset()); err != nil {
				return nil, err
			}
			if _, dup := obj[k]; dup {
				return nil, one(fieldPath(path), "duplicate field "+quote(k))
			}
			v, err := p.value(append(path, k), depth+1)
			if err != nil {
				return nil, err
			}
			obj[k] = v
		}
		_, err := p.token() // '}'
		return obj, err
	case json.Number:
		if p.intsOnly && strings.ContainsAny(string(t), ".eE") {
			return nil, one(fieldPath(path), "must be an integer, not "+truncate(string(t)))
		}
		return t, nil
	default: // string, bool, nil
		return t, nil
	}
}

// flatten turns the library's tree of errors into its most specific leaves.
func flatten(name string, doc any, ve *jsonschema.ValidationError) *Error {
	// A leaf under propertyNames (spec.labels' keys) is located at the
	// key as a value of its own, not at the object: keyOf names the
	// object's location for each such leaf.
	var leaves []*jsonschema.ValidationError
	keyOf := map[*jsonschema.ValidationError][]string{}
	var walk func(e *jsonschema.ValidationError, under []string)
	walk = func(e *jsonschema.ValidationError, under []string) {
		if _, ok := e.ErrorKind.(*kind.PropertyNames); ok {
			under = e.InstanceLocation
		}
		if len(e.Causes) == 0 {
			leaves = append(leaves, e)
			if under != nil {
				keyOf[e] = under
			}
			return
		}
		for _, c := range e.Causes {
			walk(c, under)
		}
	}
	walk(ve, nil)

	var causes []Cause
	seen := map[Cause]bool{}
	for _, l := range leaves {
		described := describe(name, doc, l)
		if obj, ok := keyOf[l]; ok {
			for i := range described {
				described[i] = Cause{Field: fieldPath(obj), Rule: "key " + described[i].Rule}
			}
		}
		for _, c := range described {
			if !seen[c] {
				seen[c] = true
				causes = append(causes, c)
			}
		}
	}
	sort.Slice(causes, func(i, j int) bool {
		if causes[i].Field != causes[j].Field {
			return causes[i].Field < causes[j].Field
		}
		return causes[i].Rule < causes[j].Rule
	})
	e := &Error{Causes: causes}
	if len(causes) > maxCauses {
		e.Causes, e.More = causes[:maxCauses], len(causes)-maxCauses
	}
	if len(e.Causes) == 0 { // cannot happen: every failure has a leaf
		e.Causes = []Cause{{Field: "body", Rule: ve.Error()}}
	}
	return e
}

// describe words one leaf error as causes (a missing or unknown field list
// gives one cause per field).
func describe(schema string, doc any, e *jsonschema.ValidationError) []Cause {
	loc := e.InstanceLocation
	at := fieldPath(loc)
	var rule string
	switch k := e.ErrorKind.(type) {
	case *kind.Required:
		out := make([]Cause, 0, len(k.Missing))
		for _, m := range k.Missing {
			out = append(out, Cause{Field: fieldPath(append(slices.Clone(loc), m)), Rule: "is required"})
		}
		return out
	case *kind.AdditionalProperties:
		out := make([]Cause, 0, len(k.Properties))
		for _, p := range k.Properties {
			out = append(out, Cause{Field: at, Rule: "unknown field " + quote(p)})
		}
		return out
	case *kind.FalseSchema:
		switch {
		case len(loc) == 0:
			rule = "is not allowed"
		case strings.HasSuffix(e.SchemaURL, "/unevaluatedProperties") || strings.HasSuffix(e.SchemaURL, "/additionalProperties"):
			return []Cause{{Field: fieldPath(loc[:len(loc)-1]), Rule: "unknown field " + quote(loc[len(loc)-1])}}
		case strings.HasPrefix(schema, "command.") && len(loc) == 1:
			rule = "is only allowed on prepare"
		default:
			rule = "is not allowed here"
		}
	case *kind.Type:
		want := make([]string, len(k.Want))
		for i, w := range k.Want {
			want[i] = article(w)
		}
		rule = "must be " + strings.Join(want, " or ") + ", not " + article(k.Got)
	case *kind.Minimum:
		rule = "must be >= " + rat(k.Want) + " but found " + rat(k.Got)
	case *kind.Maximum:
		rule = "must be <= " + rat(k.Want) + " but found " + rat(k.Got)
	case *kind.MinLength:
		if k.Want == 1 {
			rule = "must not be empty"
		} else {
			rule = fmt.Sprintf("must be at least %d characters long but has %d", k.Want, k.Got)
		}
	case *kind.MaxLength:
		rule = fmt.Sprintf("must be at most %d characters long but has %d", k.Want, k.Got)
	case *kind.Pattern:
		rule = quote(k.Got) + " does not match pattern " + escapePattern(k.Want)
		if hint := patternHints[k.Want]; hint != "" {
			rule += " (" + hint + ")"
		}
	case *kind.Enum:
		want := make([]string, len(k.Want))
		for i, w := range k.Want {
			want[i] = display(w)
		}
		rule = "must be one of " + strings.Join(want, ", ") + " but found " + display(k.Got)
	case *kind.Const:
		rule = "must be " + display(k.Want) + " but found " + display(k.Got)
	case *kind.Not:
		rule = display(valueAt(doc, loc)) + " is not allowed"
	case *kind.Format:
		rule = display(k.Got) + " is not a valid " + k.Want
	case *kind.MinItems:
		rule = fmt.Sprintf("must have at least %d items but has %d", k.Want, k.Got)
	case *kind.UniqueItems:
		rule = fmt.Sprintf("items %d and %d are equal", k.Duplicates[0], k.Duplicates[1])
	default:
		rule = e.ErrorKind.LocalizedString(printer)
	}
	return []Cause{{Field: at, Rule: rule}}
}

// valueAt finds the value at an instance location of doc.
func valueAt(doc any, loc []string) any {
	for _, tok := range loc {
		switch d := doc.(type) {
		case map[string]any:
			doc = d[tok]
		case []any:
			i, err := strconv.Atoi(tok)
			if err != nil || i < 0 || i >= len(d) {
				return nil
			}
			doc = d[i]
		default:
			return nil
		}
	}
	return doc
}

var printer = message.NewPrinter(language.English)

// patternHints explain the patterns a user most often breaks.
var patternHints = map[string]string{
	api.NamePattern:          "lowercase letters, digits, '-' and '_'; start and end with a letter or digit; at most 63",
	`^[A-Za-z0-9_.-]{1,15}$`: "an interface name: 1-15 of A-Z a-z 0-9 _ . -",
	`^[^\r\n]*$`:             "one line",
	`^[^\r\n ]*$`:            "one word",
	`^[^\r\n :]*$`:           "a user name: no spaces, colons or line breaks",
	`^[^\x00]*$`:             "no NUL characters",
	`[^\x00-\x20\x7f]`:       "must not be blank",
	commandIDPattern:         "1-128 characters, no whitespace or control characters",
}

// commandIDPattern is the pattern of defs.json#/$defs/command-id, kept
// here for the hint; a test checks it matches the file.
const commandIDPattern = "^[^\\x00-\\x20\\x7f-\\x9f\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]+$"

// escapePattern writes the non-ASCII and non-printable characters of a
// pattern as \uXXXX, the way the schema file spells them.
func escapePattern(p string) string {
	var b strings.Builder
	for _, r := range p {
		if r < 0x20 || r > 0x7e {
			fmt.Fprintf(&b, "\\u%04x", r)
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// fieldPath renders an instance location as spec.network.type ("body" for
// the body itself).
func fieldPath(loc []string) string {
	if len(loc) == 0 {
		return "body"
	}
	return strings.Join(loc, ".")
}

func typeName(v any) string {
	switch v := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case json.Number:
		if _, err := v.Int64(); err == nil {
			return "integer"
		}
		return "number"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return fmt.Sprintf("%T", v)
}

func article(t string) string {
	switch t {
	case "null":
		return "null"
	case "integer", "object", "array":
		return "an " + t
	}
	return "a " + t
}

func rat(r *big.Rat) string {
	if r == nil {
		return "?"
	}
	if r.IsInt() {
		return r.Num().String()
	}
	f, _ := r.Float64()
	return strconv.FormatFloat(f, 'g', -1, 64)
}

// display renders a value in a message: strings quoted and cut short,
// objects and arrays by kind.
func display(v any) string {
	switch v := v.(type) {
	case string:
		return quote(v)
	case nil:
		return "null"
	case []any:
		return "an array"
	case map[string]any:
		return "an object"
	default:
		return truncate(fmt.Sprint(v))
	}
}

// quote quotes s for a message, escaping control characters and cutting it
// at 64 characters.
func quote(s string) string {
	const max = 64
	if utf8.RuneCountInString(s) > max {
		r := []rune(s)
		return strconv.Quote(string(r[:max])) + "..."
	}
	return strconv.Quote(s)
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

package schemas

// This file keeps docs/*.md, the contract of record, in step with the
// schemas in this directory and with internal/events and internal/fsm.
// The conventions it checks are described in docs/contract.md, "How this
// file is checked". In short:
//
//   - A table whose header begins "| field |" documents one JSON object. The
//     nearest line above it of the form <!-- schema: TARGET ... --> names
//     the schema(s) it documents: "file.json", "file.json#/json/pointer",
//     a glob such as "event.*.json", or "none" for a table with no schema.
//     Its first column must list exactly the schema's properties, and a
//     "required?" cell of yes or no must agree with the schema's required.
//     Every body schema must be documented by some field table.
//   - Tables whose header begins "| event type |" or "| action |" list the
//     event types and actions: together exactly the event.<type>.json and
//     command.<action>.json files. Their "required fields" column must be
//     the schema's required; an action table's "allowed from", "in flight"
//     and "result" columns must be what internal/fsm decides.
//   - In a table with a "Go" column, `Names.Method(args)` called on
//     api.DefaultNames must give the row's first cell, and every
//     name-returning method of api.Names must appear in such a cell.

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/fsm"
)

// docsDir holds the documentation, relative to this package.
const docsDir = "../docs"

// mdDoc is one parsed markdown file.
type mdDoc struct {
	name   string // "docs/contract.md"
	tables []*mdTable
	json   []mdBlock // fenced ```json blocks
}

// mdBlock is a fenced code block.
type mdBlock struct {
	line int // of the opening fence
	text string
}

// mdTable is a markdown table outside code fences.
type mdTable struct {
	doc    string
	line   int // of the header row, 1-based
	header []string
	rows   []mdRow
	marker *mdMarker // the schema marker that applies to it, if any
}

type mdRow struct {
	line  int
	cells []string
}

// mdMarker is a line <!-- schema: TARGET ... -->.
type mdMarker struct {
	doc     string
	line    int
	targets []string // empty for "none"
	none    bool
}

func (t *mdTable) where() string { return fmt.Sprintf("%s:%d", t.doc, t.line) }
func (r mdRow) where(t *mdTable) string {
	return fmt.Sprintf("%s:%d", t.doc, r.line)
}

// col is the index of the column whose header is one of names (compared
// case-insensitively, without backticks), or -1.
func (t *mdTable) col(names ...string) int {
	for i, h := range t.header {
		if slices.Contains(names, normHeader(h)) {
			return i
		}
	}
	return -1
}

func (t *mdTable) kind() string {
	if len(t.header) == 0 {
		return ""
	}
	return normHeader(t.header[0])
}

func (r mdRow) cell(i int) string {
	if i < 0 || i >= len(r.cells) {
		return ""
	}
	return r.cells[i]
}

func normHeader(h string) string {
	return strings.ToLower(strings.TrimSpace(strings.ReplaceAll(h, "`", "")))
}

var (
	mdMarkerRE    = regexp.MustCompile(`^<!--\s*schema:\s*(.*?)\s*-->$`)
	mdSeparatorRE = regexp.MustCompile(`^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$`)
	mdCodeRE      = regexp.MustCompile("`([^`]*)`")
	mdGoCallRE    = regexp.MustCompile(`^Names\.([A-Za-z][A-Za-z0-9]*)\((.*)\)$`)
)

// parseMarkdown finds the tables and schema markers of one file. problems
// are markers that no field table follows.
func parseMarkdown(name, text string) (*mdDoc, []string) {
	doc := &mdDoc{name: name}
	var problems []string
	var pending *mdMarker
	var cur *mdTable
	fence := ""
	var block *mdBlock // the ```json block being read
	lines := strings.Split(text, "\n")
	for i := 0; i < len(lines); i++ {
		line := strings.TrimRight(lines[i], "\r")
		trimmed := strings.TrimSpace(line)
		if fence != "" {
			if strings.HasPrefix(trimmed, fence) {
				fence = ""
				if block != nil {
					doc.json = append(doc.json, *block)
					block = nil
				}
			} else if block != nil {
				block.text += line + "\n"
			}
			continue
		}
		if strings.HasPrefix(trimmed, "```") || strings.HasPrefix(trimmed, "~~~") {
			fence = trimmed[:3]
			if strings.TrimSpace(trimmed[3:]) == "json" {
				block = &mdBlock{line: i + 1}
			}
			cur = nil
			continue
		}
		if cur != nil {
			if strings.HasPrefix(trimmed, "|") {
				cur.rows = append(cur.rows, mdRow{line: i + 1, cells: splitRow(trimmed)})
				continue
			}
			cur = nil
		}
		if m := mdMarkerRE.FindStringSubmatch(trimmed); m != nil {
			if pending != nil {
				problems = append(problems, fmt.Sprintf("%s:%d: schema marker is not followed by a `| field |` table (another marker comes first)", name, pending.line))
			}
			pending = &mdMarker{doc: name, line: i + 1}
			f := strings.Fields(m[1])
			if len(f) == 0 {
				problems = append(problems, fmt.Sprintf("%s:%d: schema marker names no schema (write <!-- schema: FILE.json[#/pointer] --> or <!-- schema: none -->)", name, i+1))
			} else if f[0] == "none" {
				pending.none = true
			} else {
				pending.targets = f
			}
			continue
		}
		if strings.HasPrefix(trimmed, "|") && i+1 < len(lines) && mdSeparatorRE.MatchString(strings.TrimSpace(lines[i+1])) {
			cur = &mdTable{doc: name, line: i + 1, header: splitRow(trimmed)}
			doc.tables = append(doc.tables, cur)
			i++ // the separator
			if cur.kind() == "field" {
				cur.marker, pending = pending, nil
			} else if pending != nil {
				problems = append(problems, fmt.Sprintf("%s:%d: schema marker is followed by a table whose header does not begin `| field |` (line %d)", name, pending.line, cur.line))
				pending = nil
			}
		}
	}
	if pending != nil {
		problems = append(problems, fmt.Sprintf("%s:%d: schema marker is not followed by a `| field |` table", name, pending.line))
	}
	return doc, problems
}

// splitRow splits "| a | b \| c |" into ["a", "b | c"].
func splitRow(line string) []string {
	line = strings.TrimSpace(line)
	line = strings.TrimPrefix(line, "|")
	if strings.HasSuffix(line, "|") && !strings.HasSuffix(line, `\|`) {
		line = line[:len(line)-1]
	}
	var cells []string
	var b strings.Builder
	for i := 0; i < len(line); i++ {
		switch {
		case line[i] == '\\' && i+1 < len(line) && line[i+1] == '|':
			b.WriteByte('|')
			i++
		case line[i] == '|':
			cells = append(cells, strings.TrimSpace(b.String()))
			b.Reset()
		default:
			b.WriteByte(line[i])
		}
	}
	return append(cells, strings.TrimSpace(b.String()))
}

// codeSpans are the `...` spans of a cell.
func codeSpans(cell string) []string {
	var out []string
	for _, m := range mdCodeRE.FindAllStringSubmatch(cell, -1) {
		out = append(out, m[1])
	}
	return out
}

// firstName is a cell's first code span, else its text.
func firstName(cell string) string {
	if c := codeSpans(cell); len(c) > 0 {
		return strings.TrimSpace(c[0])
	}
	return strings.TrimSpace(cell)
}

// loadDocs parses every docs/*.md.
func loadDocs(t *testing.T) ([]*mdDoc, []string) {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(docsDir, "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	if len(paths) == 0 {
		t.Fatalf("no %s/*.md: the contract of record is missing", docsDir)
	}
	sort.Strings(paths)
	var docs []*mdDoc
	var problems []string
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		d, probs := parseMarkdown("docs/"+filepath.Base(p), string(b))
		docs = append(docs, d)
		problems = append(problems, probs...)
	}
	return docs, problems
}

// ---- schemas as the docs see them --------------------------------------------

// docSchemas reads the embedded schema files, parsed once per check.
type docSchemas struct {
	parsed map[string]map[string]any
}

func (s *docSchemas) file(name string) (map[string]any, error) {
	if d, ok := s.parsed[name]; ok {
		return d, nil
	}
	b, err := files.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("schemas/%s does not exist", name)
	}
	var d map[string]any
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("schemas/%s: %v", name, err)
	}
	if s.parsed == nil {
		s.parsed = map[string]map[string]any{}
	}
	s.parsed[name] = d
	return d, nil
}

// resolve finds the sub-schema at a JSON pointer ("" or "/" for the root).
func (s *docSchemas) resolve(file, pointer string) (map[string]any, error) {
	d, err := s.file(file)
	if err != nil {
		return nil, err
	}
	var node any = d
	for _, tok := range strings.Split(strings.TrimPrefix(pointer, "/"), "/") {
		if tok == "" {
			continue
		}
		tok = strings.ReplaceAll(strings.ReplaceAll(tok, "~1", "/"), "~0", "~")
		switch n := node.(type) {
		case map[string]any:
			v, ok := n[tok]
			if !ok {
				return nil, fmt.Errorf("schemas/%s has nothing at #%s (no %q)", file, pointer, tok)
			}
			node = v
		case []any:
			i, err := strconv.Atoi(tok)
			if err != nil || i < 0 || i >= len(n) {
				return nil, fmt.Errorf("schemas/%s has nothing at #%s (no item %q)", file, pointer, tok)
			}
			node = n[i]
		default:
			return nil, fmt.Errorf("schemas/%s has nothing at #%s", file, pointer)
		}
	}
	m, ok := node.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("schemas/%s#%s is not a schema object", file, pointer)
	}
	return m, nil
}

// ref resolves a $ref found in file.
func (s *docSchemas) ref(file, ref string) (string, map[string]any, error) {
	ref = strings.TrimPrefix(ref, BaseURL)
	f, ptr, _ := strings.Cut(ref, "#")
	if f == "" {
		f = file
	}
	m, err := s.resolve(f, ptr)
	return f, m, err
}

// properties are the property names a schema allows: its own, and those of
// the schemas it applies through $ref, allOf, anyOf, oneOf, then and else.
func (s *docSchemas) properties(file string, node map[string]any) (map[string]bool, error) {
	out := map[string]bool{}
	err := s.walk(file, node, map[string]bool{}, true, func(n map[string]any) {
		if p, ok := n["properties"].(map[string]any); ok {
			for k := range p {
				out[k] = true
			}
		}
	})
	return out, err
}

// required are the property names a schema always requires: its own
// required, and that of the schemas it applies unconditionally ($ref,
// allOf).
func (s *docSchemas) required(file string, node map[string]any) (map[string]bool, error) {
	out := map[string]bool{}
	err := s.walk(file, node, map[string]bool{}, false, func(n map[string]any) {
		if r, ok := n["required"].([]any); ok {
			for _, k := range r {
				if k, ok := k.(string); ok {
					out[k] = true
				}
			}
		}
	})
	return out, err
}

func (s *docSchemas) walk(file string, node map[string]any, seen map[string]bool, conditional bool, visit func(map[string]any)) error {
	visit(node)
	if r, ok := node["$ref"].(string); ok {
		f, m, err := s.ref(file, r)
		if err != nil {
			return err
		}
		_, ptr, _ := strings.Cut(r, "#")
		if key := f + "#" + ptr; !seen[key] {
			seen[key] = true
			if err := s.walk(f, m, seen, conditional, visit); err != nil {
				return err
			}
		}
	}
	keys := []string{"allOf"}
	if conditional {
		keys = append(keys, "anyOf", "oneOf")
	}
	for _, k := range keys {
		list, _ := node[k].([]any)
		for _, sub := range list {
			if m, ok := sub.(map[string]any); ok {
				if err := s.walk(file, m, seen, conditional, visit); err != nil {
					return err
				}
			}
		}
	}
	if conditional {
		for _, k := range []string{"then", "else"} {
			if m, ok := node[k].(map[string]any); ok {
				if err := s.walk(file, m, seen, conditional, visit); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// docTarget is one schema a field table documents.
type docTarget struct {
	file, pointer string
}

func (t docTarget) String() string {
	if t.pointer == "" {
		return t.file
	}
	return t.file + "#/" + t.pointer
}

// expand turns a marker's target ("event.*.json#/x") into schema files.
func (s *docSchemas) expand(target string) ([]docTarget, error) {
	pattern, ptr, _ := strings.Cut(target, "#")
	if _, err := path.Match(pattern, ""); err != nil {
		return nil, fmt.Errorf("bad schema file pattern %q: %v", pattern, err)
	}
	matches, err := fs.Glob(files, pattern)
	if err != nil {
		return nil, err
	}
	if len(matches) == 0 {
		return nil, fmt.Errorf("no schema file matches %q (the files are schemas/*.json)", pattern)
	}
	var out []docTarget
	for _, m := range matches {
		out = append(out, docTarget{file: m, pointer: strings.TrimPrefix(ptr, "/")})
	}
	return out, nil
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// ---- the checks ---------------------------------------------------------------

// checkDocs returns every disagreement between the docs and the code, each
// saying what is missing where.
func checkDocs(docs []*mdDoc) []string {
	var problems []string
	add := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	s := &docSchemas{}
	var tables []*mdTable
	for _, d := range docs {
		tables = append(tables, d.tables...)
	}

	// (a) field tables against their schemas.
	documented := map[string]bool{} // schema files documented at their root
	for _, t := range tables {
		if t.kind() != "field" {
			continue
		}
		if t.marker == nil {
			add("%s: `| field |` table has no <!-- schema: FILE.json[#/pointer] --> (or <!-- schema: none -->) line above it", t.where())
			continue
		}
		if t.marker.none {
			continue
		}
		fields := map[string]int{} // name -> row line
		var order []string
		for _, r := range t.rows {
			name := firstName(r.cell(0))
			if name == "" {
				add("%s: field table row has no field name in its first column", r.where(t))
				continue
			}
			if _, dup := fields[name]; dup {
				add("%s: field `%s` is listed twice in this table", r.where(t), name)
				continue
			}
			fields[name] = r.line
			order = append(order, name)
		}
		reqCol := t.col("required?", "required")
		// Disagreements are grouped by what is wrong, listing the schemas
		// (a glob may name many) each applies to.
		var keys []string
		bad := map[string][]string{}
		note := func(key, schema string) {
			if _, ok := bad[key]; !ok {
				keys = append(keys, key)
			}
			bad[key] = append(bad[key], "schemas/"+schema)
		}
		for _, target := range t.marker.targets {
			ts, err := s.expand(target)
			if err != nil {
				add("%s:%d: schema marker: %v", t.marker.doc, t.marker.line, err)
				continue
			}
			for _, tg := range ts {
				node, err := s.resolve(tg.file, tg.pointer)
				if err != nil {
					add("%s:%d: schema marker: %v", t.marker.doc, t.marker.line, err)
					continue
				}
				if tg.pointer == "" {
					documented[tg.file] = true
				}
				props, err := s.properties(tg.file, node)
				if err != nil {
					add("%s: following the $refs of schemas/%s: %v", t.where(), tg, err)
					continue
				}
				for _, name := range order {
					if !props[name] {
						note(fmt.Sprintf("%s:%d: the doc lists field `%s`, but there is no such property in", t.doc, fields[name], name), tg.String())
					}
				}
				for _, p := range sortedKeys(props) {
					if _, ok := fields[p]; !ok {
						note(fmt.Sprintf("%s: the field table (schema marker at line %d) does not list property `%s` of", t.where(), t.marker.line, p), tg.String())
					}
				}
				if reqCol < 0 {
					continue
				}
				req, err := s.required(tg.file, node)
				if err != nil {
					add("%s: following the $refs of schemas/%s: %v", t.where(), tg, err)
					continue
				}
				for _, r := range t.rows {
					name := firstName(r.cell(0))
					switch strings.ToLower(strings.Trim(strings.TrimSpace(r.cell(reqCol)), "`*_")) {
					case "yes":
						if props[name] && !req[name] {
							note(fmt.Sprintf("%s: field `%s` is marked required (yes), but it is not required by", r.where(t), name), tg.String())
						}
					case "no":
						if req[name] {
							note(fmt.Sprintf("%s: field `%s` is marked not required (no), but it is required by", r.where(t), name), tg.String())
						}
					}
				}
			}
		}
		for _, k := range keys {
			add("%s %s", k, strings.Join(bad[k], ", "))
		}
	}
	for _, n := range Names() {
		if f := n + ".json"; !documented[f] {
			add("schemas/%s: no `| field |` table in docs/*.md documents it (put one under a line <!-- schema: %s -->)", f, f)
		}
	}

	// (b) event types and actions against the schema files, and the state
	// machine table against internal/fsm.
	for _, list := range []struct {
		kind, prefix string
	}{{"event type", "event."}, {"action", "command."}} {
		inDocs := map[string]string{} // value -> where
		for _, t := range tables {
			if t.kind() != list.kind {
				continue
			}
			reqCol := t.col("required fields")
			for _, r := range t.rows {
				v := firstName(r.cell(0))
				if v == "" {
					add("%s: `| %s |` table row has no %s in its first column", r.where(t), list.kind, list.kind)
					continue
				}
				if _, seen := inDocs[v]; !seen {
					inDocs[v] = r.where(t)
				}
				file := list.prefix + v + ".json"
				root, err := s.resolve(file, "")
				if err != nil {
					add("%s: the doc lists %s `%s`, but there is no schemas/%s", r.where(t), list.kind, v, file)
					continue
				}
				if reqCol >= 0 {
					req, err := s.required(file, root)
					if err != nil {
						add("%s: following the $refs of schemas/%s: %v", r.where(t), file, err)
					} else {
						checkSet(add, r.where(t), fmt.Sprintf("required fields of %s `%s`", list.kind, v), "schemas/"+file+" required", codeSpans(r.cell(reqCol)), sortedKeys(req))
					}
				}
				if list.kind == "action" {
					checkFSMRow(add, t, r, v)
				}
			}
		}
		if len(inDocs) == 0 {
			add("docs/*.md: no table whose header begins `| %s |` lists the %ss", list.kind, list.kind)
			continue
		}
		matches, _ := fs.Glob(files, list.prefix+"*.json")
		for _, m := range matches {
			v := strings.TrimSuffix(strings.TrimPrefix(m, list.prefix), ".json")
			if _, ok := inDocs[v]; !ok {
				add("schemas/%s exists, but no `| %s |` table in docs/*.md lists `%s`", m, list.kind, v)
			}
		}
	}

	// (c) names against api.Names.
	names := reflect.ValueOf(api.DefaultNames)
	used := map[string]bool{}
	for _, t := range tables {
		goCol := t.col("go")
		if goCol < 0 {
			continue
		}
		for _, r := range t.rows {
			cell := strings.TrimSpace(r.cell(goCol))
			if cell == "" || cell == "—" || cell == "-" {
				continue
			}
			call := firstName(cell)
			m := mdGoCallRE.FindStringSubmatch(call)
			if m == nil {
				add("%s: Go cell %q is not of the form `Names.Method(arg, ...)`", r.where(t), cell)
				continue
			}
			method := names.MethodByName(m[1])
			if !method.IsValid() {
				add("%s: api.Names has no method %s", r.where(t), m[1])
				continue
			}
			used[m[1]] = true
			var args []string
			if strings.TrimSpace(m[2]) != "" {
				for _, a := range strings.Split(m[2], ",") {
					args = append(args, strings.TrimSpace(a))
				}
			}
			got, err := callNames(method, args)
			if err != nil {
				add("%s: %s: %v", r.where(t), call, err)
				continue
			}
			if want := firstName(r.cell(0)); got != want {
				add("%s: the doc says `%s`, but api.DefaultNames.%s(%s) is `%s`", r.where(t), want, m[1], strings.Join(args, ", "), got)
			}
		}
	}
	rt := names.Type()
	for i := range rt.NumMethod() {
		m := rt.Method(i)
		if isNameMethod(names.Method(i).Type()) && !used[m.Name] {
			add("api.Names.%s is documented nowhere: add a row with `Names.%s(...)` in a `Go` column of a table in docs/*.md (e.g. the subjects table of docs/contract.md)", m.Name, m.Name)
		}
	}
	return problems
}

// isNameMethod: a method that builds one name from string-like arguments.
func isNameMethod(ft reflect.Type) bool {
	if ft.NumOut() != 1 || ft.Out(0).Kind() != reflect.String {
		return false
	}
	for i := range ft.NumIn() {
		if ft.In(i).Kind() != reflect.String {
			return false
		}
	}
	return true
}

func callNames(method reflect.Value, args []string) (string, error) {
	ft := method.Type()
	if !isNameMethod(ft) {
		return "", fmt.Errorf("is not a method that returns one name from string arguments")
	}
	if ft.NumIn() != len(args) {
		return "", fmt.Errorf("takes %d arguments, the doc gives %d", ft.NumIn(), len(args))
	}
	in := make([]reflect.Value, len(args))
	for i, a := range args {
		in[i] = reflect.ValueOf(a).Convert(ft.In(i))
	}
	return method.Call(in)[0].String(), nil
}

// checkSet reports the difference between a list in the doc and the code's.
func checkSet(add func(string, ...any), where, what, source string, doc, code []string) {
	for _, d := range doc {
		if !slices.Contains(code, d) {
			add("%s: %s: the doc lists `%s`, which %s does not", where, what, d, source)
		}
	}
	for _, c := range code {
		if !slices.Contains(doc, c) {
			add("%s: %s: %s has `%s`, which the doc does not list", where, what, source, c)
		}
	}
}

// checkFSMRow compares one row of an action table with internal/fsm.
func checkFSMRow(add func(string, ...any), t *mdTable, r mdRow, action string) {
	a := fsm.Action(action)
	allowed := fsm.Allowed(a)
	if len(allowed) == 0 {
		add("%s: `%s` is not an fsm.Action (fsm.Actions: %v)", r.where(t), action, fsm.Actions)
		return
	}
	if c := t.col("allowed from"); c >= 0 {
		var want []string
		for _, s := range allowed {
			want = append(want, string(s))
		}
		checkSet(add, r.where(t), fmt.Sprintf("states `%s` is allowed from", action), "fsm.Allowed", codeSpans(r.cell(c)), want)
	}
	inflight, err := fsm.Decide(allowed[0], a)
	if err != nil {
		add("%s: fsm.Decide(%s, %s): %v", r.where(t), allowed[0], a, err)
		return
	}
	if !fsm.Transitional(inflight) {
		// An action done when decided (purge): no in-flight state, no
		// result; the result column names the state its decision leaves.
		if c := t.col("in flight"); c >= 0 && len(codeSpans(r.cell(c))) > 0 {
			add("%s: `%s` has no in-flight state (fsm.Decide says `%s`), the doc says %v", r.where(t), action, inflight, codeSpans(r.cell(c)))
		}
		if c := t.col("result"); c >= 0 && !slices.Equal(codeSpans(r.cell(c)), []string{string(inflight)}) {
			add("%s: `%s` leaves the vm `%s` when decided (fsm.Decide), the doc says %v", r.where(t), action, inflight, codeSpans(r.cell(c)))
		}
		return
	}
	if c := t.col("in flight"); c >= 0 {
		if got := codeSpans(r.cell(c)); !slices.Equal(got, []string{string(inflight)}) {
			add("%s: in-flight state of `%s`: the doc says %v, fsm.Decide says `%s`", r.where(t), action, got, inflight)
		}
	}
	if c := t.col("result"); c >= 0 {
		ok := api.ResultOf(fsm.Action(action))
		okState, _ := fsm.Apply(inflight, fsm.Result(ok))
		failState, _ := fsm.Apply(inflight, fsm.ResFailed)
		want := []string{string(ok), string(okState), string(api.TypeFailed), string(failState)}
		if returns(fsm.Action(action), inflight) {
			// A migrate's results return the VM to the state it had
			// (fsm.Settle): the doc names the results and says so.
			want = []string{string(ok), string(api.TypeFailed)}
			if !strings.Contains(r.cell(c), "the state it had") {
				add("%s: results of `%s` return the VM to the state it had (fsm.Settle); the doc must say so", r.where(t), action)
			}
		}
		if got := codeSpans(r.cell(c)); !slices.Equal(got, want) {
			add("%s: results of `%s`: the doc says %v, internal/fsm and api.ResultOf say `%s` → `%s`; `%s` → `%s`",
				r.where(t), action, got, want[0], want[1], want[2], want[3])
		}
	}
}

// returns reports whether both results of action a, from its in-flight
// state, return the VM to whichever state a was accepted from.
func returns(a fsm.Action, inflight api.VmState) bool {
	from := fsm.Allowed(a)
	if len(from) < 2 {
		return false
	}
	for _, before := range from {
		for _, r := range []fsm.Result{a.Success(), fsm.ResFailed} {
			if got, ok := fsm.Settle(inflight, before, r); !ok || got != before {
				return false
			}
		}
	}
	return true
}

// ---- tests ----------------------------------------------------------------------

// TestDocsMatchSchemas keeps docs/*.md in step with the schemas,
// internal/events and internal/fsm.
func TestDocsMatchSchemas(t *testing.T) {
	docs, problems := loadDocs(t)
	problems = append(problems, checkDocs(docs)...)
	for _, p := range problems {
		t.Error(p)
	}
}

// TestDocsJSONExamples: every ```json block in the docs is valid JSON, and
// one with a "type" is a valid event.
func TestDocsJSONExamples(t *testing.T) {
	docs, _ := loadDocs(t)
	for _, d := range docs {
		for _, b := range d.json {
			var v any
			if err := json.Unmarshal([]byte(b.text), &v); err != nil {
				t.Errorf("%s:%d: the ```json block is not valid JSON: %v", d.name, b.line, err)
				continue
			}
			if obj, ok := v.(map[string]any); ok && obj["type"] != nil {
				if err := ValidateEvent([]byte(b.text)); err != nil {
					t.Errorf("%s:%d: the example event breaks its schema: %v", d.name, b.line, err)
				}
			}
		}
	}
}

// TestDocsCheckCatchesDrift proves the check fails when the doc drifts: it
// edits the parsed docs in memory and expects each edit to be reported.
func TestDocsCheckCatchesDrift(t *testing.T) {
	edits := []struct {
		name string
		// edit changes the docs; it reports false if it found nothing to change.
		edit func(docs []*mdDoc) bool
		want string
	}{
		{"field row removed", func(docs []*mdDoc) bool {
			return editTable(docs, "field", "timeout_s", func(t *mdTable, i int) { t.rows = slices.Delete(t.rows, i, i+1) })
		}, "does not list property `timeout_s` of schemas/"},
		{"unknown field added", func(docs []*mdDoc) bool {
			return editTable(docs, "field", "vcpus", func(t *mdTable, i int) {
				t.rows = append(t.rows, mdRow{line: 9999, cells: []string{"`gpus`", "integer", "no", "GPUs"}})
			})
		}, "the doc lists field `gpus`, but there is no such property in schemas/defs.json#/$defs/vm-spec"},
		{"required flipped", func(docs []*mdDoc) bool {
			return editTable(docs, "field", "generation", func(t *mdTable, i int) {
				c := t.col("required?")
				t.rows[i].cells = slices.Clone(t.rows[i].cells)
				t.rows[i].cells[c] = "no"
			})
		}, "marked not required"},
		{"event type removed", func(docs []*mdDoc) bool {
			return editTable(docs, "event type", "exited", func(t *mdTable, i int) { t.rows = slices.Delete(t.rows, i, i+1) })
		}, "lists `exited`"},
		{"allowed-from changed", func(docs []*mdDoc) bool {
			return editTable(docs, "action", "suspend", func(t *mdTable, i int) {
				c := t.col("allowed from")
				t.rows[i].cells = slices.Clone(t.rows[i].cells)
				t.rows[i].cells[c] = "`running`, `suspended`"
			})
		}, "fsm.Allowed"},
		{"subject changed", func(docs []*mdDoc) bool {
			return editTable(docs, "subject", "vm.task.<host>.<vm>", func(t *mdTable, i int) {
				t.rows[i].cells = slices.Clone(t.rows[i].cells)
				t.rows[i].cells[0] = "`vm.task.<vm>.<host>`"
			})
		}, "api.DefaultNames.Task"},
	}
	for _, e := range edits {
		t.Run(e.name, func(t *testing.T) {
			docs, _ := loadDocs(t)
			if !e.edit(docs) {
				t.Fatalf("found nothing to edit in docs/*.md")
			}
			problems := checkDocs(docs)
			for _, p := range problems {
				if strings.Contains(p, e.want) {
					return
				}
			}
			t.Fatalf("no problem mentions %q; got %q", e.want, problems)
		})
	}
}

// editTable applies edit to the first row named name in a table of kind.
func editTable(docs []*mdDoc, kind, name string, edit func(t *mdTable, row int)) bool {
	for _, d := range docs {
		for _, t := range d.tables {
			if t.kind() != kind {
				continue
			}
			for i, r := range t.rows {
				if firstName(r.cell(0)) == name {
					edit(t, i)
					return true
				}
			}
		}
	}
	return false
}

func TestSplitRow(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []string
	}{
		{"| a | b |", []string{"a", "b"}},
		{"|a|b", []string{"a", "b"}},
		{`| x \| y | z |`, []string{"x | y", "z"}},
		{"| `a` |  |", []string{"`a`", ""}},
	} {
		if got := splitRow(c.in); !slices.Equal(got, c.want) {
			t.Errorf("splitRow(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

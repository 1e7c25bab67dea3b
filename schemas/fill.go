package schemas

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"sync"
)

// fill sets dst from a document of the parse's generic form (maps,
// slices, json.Number, strings, bools, nil), matching object fields to
// struct fields by their json tags, as encoding/json would from the same
// bytes (a test checks that on every valid command). It is what lets a
// command be parsed once: go-viper/mapstructure does the same job, but
// re-reads every struct's tags on each call and measured about 1.6 times
// slower than the second parse by encoding/json it was to replace (per
// prepare body, same run); this keeps each type's field table, and parse
// plus check plus fill takes about 0.7 of parse plus check plus a second
// parse.
func fill(dst reflect.Value, v any) error {
	if v == nil {
		return nil // null leaves the zero value, as in encoding/json
	}
	switch dst.Kind() {
	case reflect.Pointer:
		p := reflect.New(dst.Type().Elem())
		if err := fill(p.Elem(), v); err != nil {
			return err
		}
		dst.Set(p)
	case reflect.Struct:
		obj, ok := v.(map[string]any)
		if !ok {
			return fmt.Errorf("%s from %T", dst.Type(), v)
		}
		fields := fieldsOf(dst.Type())
		for k, fv := range obj {
			i, ok := fields[k]
			if !ok {
				return fmt.Errorf("unknown field %q in %s", k, dst.Type())
			}
			if err := fill(dst.Field(i), fv); err != nil {
				return fmt.Errorf("%s: %w", k, err)
			}
		}
	case reflect.Slice:
		arr, ok := v.([]any)
		if !ok {
			return fmt.Errorf("%s from %T", dst.Type(), v)
		}
		s := reflect.MakeSlice(dst.Type(), len(arr), len(arr))
		for i, ev := range arr {
			if err := fill(s.Index(i), ev); err != nil {
				return fmt.Errorf("%d: %w", i, err)
			}
		}
		dst.Set(s)
	case reflect.Map:
		// Maps with string keys (spec.labels): each value is filled like
		// a field.
		obj, ok := v.(map[string]any)
		if !ok || dst.Type().Key().Kind() != reflect.String {
			return fmt.Errorf("%s from %T", dst.Type(), v)
		}
		m := reflect.MakeMapWithSize(dst.Type(), len(obj))
		for k, ev := range obj {
			e := reflect.New(dst.Type().Elem()).Elem()
			if err := fill(e, ev); err != nil {
				return fmt.Errorf("%s: %w", k, err)
			}
			m.SetMapIndex(reflect.ValueOf(k).Convert(dst.Type().Key()), e)
		}
		dst.Set(m)
	case reflect.String:
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("%s from %T", dst.Type(), v)
		}
		dst.SetString(s)
	case reflect.Bool:
		b, ok := v.(bool)
		if !ok {
			return fmt.Errorf("%s from %T", dst.Type(), v)
		}
		dst.SetBool(b)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		n, ok := v.(json.Number)
		if !ok {
			return fmt.Errorf("%s from %T", dst.Type(), v)
		}
		i, err := n.Int64()
		if err != nil || dst.OverflowInt(i) {
			return fmt.Errorf("%s does not fit %s", n, dst.Type())
		}
		dst.SetInt(i)
	default:
		return fmt.Errorf("cannot fill a %s", dst.Type())
	}
	return nil
}

var fieldTables sync.Map // reflect.Type -> map[string]int

// fieldsOf maps a struct's json names to its field indexes.
func fieldsOf(t reflect.Type) map[string]int {
	if m, ok := fieldTables.Load(t); ok {
		return m.(map[string]int)
	}
	m := map[string]int{}
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if !f.IsExported() || name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		m[name] = i
	}
	fieldTables.Store(t, m)
	return m
}

package vmctl

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"

	"go.yaml.in/yaml/v3"
)

// printYAML writes v as YAML with the field names of its JSON form: v goes
// through encoding/json first, so the two formats never differ in a name,
// and numbers stay integers where JSON has integers.
func printYAML(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var doc any
	if err := dec.Decode(&doc); err != nil {
		return err
	}
	out, err := yaml.Marshal(numbers(doc))
	if err != nil {
		return fmt.Errorf("yaml: %w", err)
	}
	_, err = w.Write(out)
	return err
}

// numbers turns the json.Numbers in a decoded document into int64 or
// float64, which YAML writes as numbers.
func numbers(v any) any {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			v[k] = numbers(x)
		}
	case []any:
		for i, x := range v {
			v[i] = numbers(x)
		}
	case json.Number:
		if n, err := v.Int64(); err == nil {
			return n
		}
		if f, err := v.Float64(); err == nil {
			return f
		}
		return v.String()
	}
	return v
}

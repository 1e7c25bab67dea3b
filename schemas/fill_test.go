package schemas

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func TestFill(t *testing.T) {
	type inner struct {
		N int8 `json:"n"`
	}
	type outer struct {
		S    string            `json:"s,omitempty"`
		B    bool              `json:"b"`
		L    []string          `json:"l"`
		P    *inner            `json:"p"`
		M    map[string]string `json:"m"`
		Skip string            `json:"-"`
	}
	var got outer
	doc := map[string]any{"s": "x", "b": true, "l": []any{"a", "b"}, "p": map[string]any{"n": json.Number("7")}, "m": map[string]any{"k": "v", "e": ""}}
	if err := fill(reflect.ValueOf(&got).Elem(), doc); err != nil {
		t.Fatal(err)
	}
	want := outer{S: "x", B: true, L: []string{"a", "b"}, P: &inner{N: 7}, M: map[string]string{"k": "v", "e": ""}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("filled %+v, want %+v", got, want)
	}
	for _, c := range []struct {
		doc  map[string]any
		want string
	}{
		{map[string]any{"p": map[string]any{"n": json.Number("300")}}, "p: n: 300 does not fit int8"},
		{map[string]any{"p": map[string]any{"n": json.Number("1.5")}}, "does not fit"},
		{map[string]any{"nope": "x"}, `unknown field "nope"`},
		{map[string]any{"-": "x"}, `unknown field "-"`},
		{map[string]any{"s": json.Number("1")}, "string from json.Number"},
		{map[string]any{"l": "a"}, "[]string from string"},
		{map[string]any{"m": "a"}, "map[string]string from string"},
		{map[string]any{"m": map[string]any{"k": json.Number("1")}}, "m: k: string from json.Number"},
	} {
		var o outer
		err := fill(reflect.ValueOf(&o).Elem(), c.doc)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: error %v, want %q", c.doc, err, c.want)
		}
	}
}

package vmctl

import (
	"errors"
	"strings"
	"testing"

	"github.com/vmherd/vmherd/api"
)

func TestParseLabels(t *testing.T) {
	got, err := parseLabels([]string{"team=ci", "job=", "ci.example.com/run=a=b"})
	if err != nil || len(got) != 3 || got["team"] != "ci" || got["job"] != "" || got["ci.example.com/run"] != "a=b" {
		t.Fatalf("parseLabels = %v, %v", got, err)
	}
	for _, c := range []struct {
		flags []string
		want  string
	}{
		{[]string{"team"}, "give KEY=VALUE"},
		{[]string{"team=a", "team=b"}, "given twice"},
		{[]string{"-x=1"}, `--label "-x=1": key "-x" must match`},
		{[]string{"team=a\nb"}, "control characters"},
	} {
		_, err := parseLabels(c.flags)
		var ee *exitError
		if err == nil || !errors.As(err, &ee) || ee.code != ExitUsage || !strings.Contains(err.Error(), c.want) {
			t.Errorf("parseLabels(%q) = %v, want a usage error with %q", c.flags, err, c.want)
		}
	}
}

func TestLabelSelector(t *testing.T) {
	r := &api.VmRecord{Name: "a", Labels: map[string]string{"team": "ci", "job": "17", "empty": ""}}
	bare := &api.VmRecord{Name: "b"}
	for _, c := range []struct {
		flags     []string
		rec, bare bool
	}{
		{nil, true, true},
		{[]string{"team=ci"}, true, false},
		{[]string{"team=web"}, false, false},
		{[]string{"team=ci", "job=17"}, true, false},
		{[]string{"team=ci", "job=18"}, false, false},
		{[]string{"job"}, true, false},
		{[]string{"empty="}, true, false},
		{[]string{"empty"}, true, false},
		{[]string{"other"}, false, false},
	} {
		sel, err := parseSelector(c.flags)
		if err != nil {
			t.Fatal(err)
		}
		if got := sel.matches(r); got != c.rec {
			t.Errorf("%q matches %v: %v, want %v", c.flags, r.Labels, got, c.rec)
		}
		if got := sel.matches(bare); got != c.bare {
			t.Errorf("%q matches no labels: %v, want %v", c.flags, got, c.bare)
		}
	}
	if _, err := parseSelector([]string{"a b=c"}); err == nil {
		t.Error("a selector with a bad key is accepted")
	}
	if got := formatLabels(r.Labels); got != "empty=,job=17,team=ci" {
		t.Errorf("formatLabels = %q", got)
	}
	if got := formatLabels(nil); got != "-" {
		t.Errorf("formatLabels(nil) = %q", got)
	}
}

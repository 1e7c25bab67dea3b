package vmctl

import (
	"maps"
	"slices"
	"strings"

	"github.com/vmherd/vmherd/api"
)

// parseLabels reads `create --label KEY=VALUE` flags (repeatable) into a
// spec's labels: each must have '=' (the value may be empty), a key may
// be given once, and each label is checked against api.ValidateLabel.
func parseLabels(flags []string) (map[string]string, error) {
	if len(flags) == 0 {
		return nil, nil
	}
	out := make(map[string]string, len(flags))
	for _, f := range flags {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return nil, usageError("--label %q: give KEY=VALUE (the value may be empty: KEY=)", f)
		}
		if _, dup := out[k]; dup {
			return nil, usageError("--label %q: label %s is given twice", f, k)
		}
		if err := api.ValidateLabel(k, v); err != nil {
			return nil, usageError("--label %q: %s", f, ruleOf(err))
		}
		out[k] = v
	}
	if err := api.ValidateLabels(out); err != nil {
		return nil, usageError("%s", flagWords(err.Error()))
	}
	return out, nil
}

// labelSelector is `list --label` (repeatable): every term must match, a
// KEY=VALUE term by the label's value, a bare KEY term by the label's
// presence.
type labelSelector []labelTerm

type labelTerm struct {
	key, value string
	anyValue   bool
}

func parseSelector(flags []string) (labelSelector, error) {
	var sel labelSelector
	for _, f := range flags {
		k, v, hasValue := strings.Cut(f, "=")
		if err := api.ValidateLabel(k, v); err != nil {
			return nil, usageError("--label %q: %s", f, ruleOf(err))
		}
		sel = append(sel, labelTerm{key: k, value: v, anyValue: !hasValue})
	}
	return sel, nil
}

// matches reports whether a record has every label the selector asks for.
func (sel labelSelector) matches(r *api.VmRecord) bool {
	for _, t := range sel {
		v, ok := r.Labels[t.key]
		if !ok || !t.anyValue && v != t.value {
			return false
		}
	}
	return true
}

// formatLabels renders labels as KEY=VALUE,... in key order ("-": none).
func formatLabels(labels map[string]string) string {
	if len(labels) == 0 {
		return "-"
	}
	parts := make([]string, 0, len(labels))
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		parts = append(parts, k+"="+labels[k])
	}
	return strings.Join(parts, ",")
}

// Package config reads a daemon's configuration file: TOML whose keys are
// the daemon's flag names (`data-dir = "/var/lib/vmherd/engine"`), one key
// per flag and nothing else. The order of precedence is the command line,
// then VMHERD_<FLAG> in the environment, then the file, then the flag's
// default. A key that names no flag, or a value its flag does not accept,
// is an error naming the file and the key, so a typo stops the daemon at
// start instead of being ignored.
package config

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/spf13/pflag"
)

// ErrInvalid is the category of every error about a configuration file.
var ErrInvalid = errors.New("invalid configuration")

// Skip reports flags that have no key: the --config flag itself and
// help.
func skip(f *pflag.Flag) bool { return f.Name == "config" || f.Name == "help" }

// Load reads the TOML file at path and sets every flag in fs that is not
// set already (on the command line or from the environment) to the
// file's value for its key.
func Load(fs *pflag.FlagSet, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return Apply(fs, path, string(b))
}

// Apply is Load on the file's text (name is for messages).
func Apply(fs *pflag.FlagSet, name, text string) error {
	var m map[string]any
	if _, err := toml.Decode(text, &m); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrInvalid, name, err)
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var errs []error
	for _, k := range keys {
		f := fs.Lookup(k)
		if f == nil || skip(f) {
			errs = append(errs, fmt.Errorf("%w: %s: unknown key %q%s", ErrInvalid, name, k, suggest(fs, k)))
			continue
		}
		if f.Changed {
			continue // the command line or the environment wins
		}
		vals, err := strs(m[k], f.Value.Type())
		if err == nil {
			err = set(fs, f, vals)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%w: %s: key %q: %w", ErrInvalid, name, k, err))
		}
	}
	return errors.Join(errs...)
}

// set gives a flag its values: a list flag all of them at once (in place
// of its default), any other flag its one value.
func set(fs *pflag.FlagSet, f *pflag.Flag, vals []string) error {
	if sv, ok := f.Value.(pflag.SliceValue); ok {
		if err := sv.Replace(vals); err != nil {
			return err
		}
		f.Changed = true
		return nil
	}
	return fs.Set(f.Name, vals[0])
}

func isList(typ string) bool {
	return strings.HasSuffix(typ, "Array") || strings.HasSuffix(typ, "Slice")
}

// strs turns a TOML value into the strings a flag of type typ accepts.
func strs(v any, typ string) ([]string, error) {
	if a, ok := v.([]any); ok {
		if !isList(typ) {
			return nil, fmt.Errorf("a list, but it takes one %s value", typ)
		}
		var out []string
		for _, e := range a {
			s, err := scalar(e, "string")
			if err != nil {
				return nil, err
			}
			out = append(out, s)
		}
		return out, nil
	}
	if isList(typ) {
		typ = "string"
	}
	s, err := scalar(v, typ)
	return []string{s}, err
}

func scalar(v any, typ string) (string, error) {
	switch x := v.(type) {
	case string:
		if typ == "bool" || typ == "int" || typ == "float64" {
			return "", fmt.Errorf("the string %q, but it takes a %s (write it without quotes)", x, typName(typ))
		}
		return x, nil
	case bool:
		if typ != "bool" {
			return "", fmt.Errorf("a boolean, but it takes a %s", typName(typ))
		}
		return strconv.FormatBool(x), nil
	case int64:
		if typ == "string" || typ == "duration" {
			return "", fmt.Errorf("the number %d, but it takes a %s (in quotes)", x, typName(typ))
		}
		return strconv.FormatInt(x, 10), nil
	case float64:
		if typ != "float64" {
			return "", fmt.Errorf("the number %g, but it takes a %s", x, typName(typ))
		}
		return strconv.FormatFloat(x, 'g', -1, 64), nil
	default:
		return "", fmt.Errorf("a %T, but it takes a %s", v, typName(typ))
	}
}

func typName(typ string) string {
	switch typ {
	case "duration":
		return `duration string such as "30s"`
	case "float64":
		return "number"
	case "int":
		return "whole number"
	case "bool":
		return "boolean (true or false)"
	}
	return "string"
}

// suggest names the known key nearest to k, if one is close.
func suggest(fs *pflag.FlagSet, k string) string {
	best, bestD := "", math.MaxInt
	fs.VisitAll(func(f *pflag.Flag) {
		if skip(f) {
			return
		}
		if d := distance(k, f.Name); d < bestD {
			best, bestD = f.Name, d
		}
	})
	if best != "" && bestD <= 3 {
		return fmt.Sprintf(" (did you mean %q? `config --print` lists every key)", best)
	}
	return " (`config --print` lists every key)"
}

// distance is the Levenshtein distance.
func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			c := 1
			if a[i-1] == b[j-1] {
				c = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+c)
		}
		prev = cur
	}
	return prev[len(b)]
}

// Print writes every flag of fs as a key with its current value (its
// default unless set), each after its help text as a comment: a file
// that Load accepts as it is.
func Print(w io.Writer, fs *pflag.FlagSet) error {
	var b strings.Builder
	fs.VisitAll(func(f *pflag.Flag) {
		if skip(f) || f.Hidden {
			return
		}
		for _, l := range strings.Split(f.Usage, "\n") {
			fmt.Fprintf(&b, "# %s\n", l)
		}
		fmt.Fprintf(&b, "%s = %s\n\n", f.Name, value(f))
	})
	_, err := io.WriteString(w, b.String())
	return err
}

// value is a flag's value in TOML.
func value(f *pflag.Flag) string {
	typ := f.Value.Type()
	if sv, ok := f.Value.(pflag.SliceValue); ok {
		var q []string
		for _, s := range sv.GetSlice() {
			q = append(q, strconv.Quote(s))
		}
		return "[" + strings.Join(q, ", ") + "]"
	}
	switch typ {
	case "bool", "int", "float64":
		return f.Value.String()
	case "duration":
		if d, err := time.ParseDuration(f.Value.String()); err == nil {
			return strconv.Quote(d.String())
		}
	}
	return strconv.Quote(f.Value.String())
}

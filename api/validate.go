package api

import (
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"
	"unicode/utf8"
)

// ErrInvalid is the category of every validation error: the message names
// the field and the rule it broke.
var ErrInvalid = errors.New("invalid")

// Limits a spec is checked against.
const (
	MaxNameLen      = 63
	MinMemoryMB     = 64
	MaxVcpus        = 255
	MaxMemoryMB     = 4 << 20 // 4 TiB
	MaxDiskGB       = 64 << 10
	MaxUserDataSize = 64 << 10 // 64 KiB: NoCloud and Propolis' 1 MiB body both fit
	// MaxLabels, MaxLabelKeyLen and MaxLabelValueLen bound a spec's labels
	// (Kubernetes' sizes: a name part and a value of at most 63).
	MaxLabels        = 32
	MaxLabelKeyLen   = 63
	MaxLabelValueLen = 63
)

// LabelKeyPattern is the rule for a label key: letters, digits, '.', '_',
// '-' and at most one '/' (a prefix such as ci.example/job); the whole key
// and each part around the '/' start and end with a letter or digit, so a
// key never looks like an option, a path or a flag value (--label=-x).
const LabelKeyPattern = `^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?(/[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?$`

var labelKeyRE = regexp.MustCompile(LabelKeyPattern)

// NamePattern is the VM name rule of docs/contract.md: a subject token and a safe
// directory name.
const NamePattern = `^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$`

var nameRE = regexp.MustCompile(NamePattern)

// FieldError names a field and the rule its value broke.
type FieldError struct {
	Field string
	Rule  string
}

func (e *FieldError) Error() string { return fmt.Sprintf("%s: %s", e.Field, e.Rule) }
func (e *FieldError) Unwrap() error { return ErrInvalid }

func fieldErr(field, format string, args ...any) error {
	return &FieldError{Field: field, Rule: fmt.Sprintf(format, args...)}
}

// ValidateName checks a VM name against NamePattern.
func ValidateName(name string) error {
	return validateToken("name", name)
}

// ValidateHost checks a host id: the same rule as VM names, since it is a
// subject token too.
func ValidateHost(host string) error {
	return validateToken("host", host)
}

// ValidateIdentity checks an identity's name (an issuer token in command
// subjects): the same rule as host ids.
func ValidateIdentity(name string) error {
	return validateToken("identity", name)
}

func validateToken(field, s string) error {
	switch {
	case s == "":
		return fieldErr(field, "must not be empty")
	case len(s) > MaxNameLen:
		return fieldErr(field, "%d characters is too long (at most %d)", len(s), MaxNameLen)
	case !nameRE.MatchString(s):
		return fieldErr(field, "%q must match %s (lowercase letters, digits, '-' and '_'; start and end with a letter or digit)", s, NamePattern)
	}
	return nil
}

// Validate checks a spec after defaults are applied. The first broken rule
// is returned; the message names the field.
func (s VmSpec) Validate() error {
	if err := ValidateName(s.Name); err != nil {
		return err
	}
	if s.Backend != "" {
		if _, err := ParseBackend(string(s.Backend)); err != nil {
			return fieldErr("spec.backend", "%q is not one of noop, qemu, propolis", s.Backend)
		}
	}
	if s.Vcpus < 1 || s.Vcpus > MaxVcpus {
		return fieldErr("spec.vcpus", "%d is out of range (1..%d)", s.Vcpus, MaxVcpus)
	}
	if s.MemoryMB < MinMemoryMB || s.MemoryMB > MaxMemoryMB {
		return fieldErr("spec.memory_mb", "%d is out of range (%d..%d MiB)", s.MemoryMB, MinMemoryMB, MaxMemoryMB)
	}
	if s.DiskGB < 0 || s.DiskGB > MaxDiskGB {
		return fieldErr("spec.disk_gb", "%d is out of range (0..%d)", s.DiskGB, MaxDiskGB)
	}
	if s.Image != "" && s.ImagePath != "" {
		return fieldErr("spec.image", "give image (a name in the host's image store) or image_path, not both")
	}
	if s.Image != "" {
		if err := validateToken("spec.image", s.Image); err != nil {
			return err
		}
	}
	if (s.Backend == BackendQEMU || s.Backend == BackendPropolis) && strings.TrimSpace(s.ImagePath) == "" && s.Image == "" {
		return fieldErr("spec.image_path", "is required for the %s backend (or spec.image, a name in the host's image store)", s.Backend)
	}
	if strings.ContainsRune(s.ImagePath, 0) {
		return fieldErr("spec.image_path", "must not contain NUL")
	}
	switch s.Accel {
	case "", "auto", "kvm", "tcg":
	default:
		return fieldErr("spec.accel", "%q is not one of auto, kvm, tcg", s.Accel)
	}
	if n := s.Network; n != nil {
		switch n.Type {
		case NetworkUser, NetworkNone:
		case NetworkTap:
			if n.Bridge != "" {
				if err := validateIfName("spec.network.bridge", n.Bridge); err != nil {
					return err
				}
			}
		case NetworkVnic:
			if n.Name != "" {
				if err := validateIfName("spec.network.name", n.Name); err != nil {
					return err
				}
			}
			if n.Link != "" {
				if err := validateLinkName("spec.network.link", n.Link); err != nil {
					return err
				}
			}
		default:
			return fieldErr("spec.network.type", "%q is not one of user, tap, vnic, none", n.Type)
		}
	}
	if c := s.CloudInit; c != nil {
		if len(c.UserData) > MaxUserDataSize {
			return fieldErr("spec.cloud_init.user_data", "%d bytes is too large (at most %d)", len(c.UserData), MaxUserDataSize)
		}
		if len(c.NetworkConfig) > MaxUserDataSize {
			return fieldErr("spec.cloud_init.network_config", "%d bytes is too large (at most %d)", len(c.NetworkConfig), MaxUserDataSize)
		}
		if len(c.InstanceID) > 255 || strings.ContainsFunc(c.InstanceID, isControl) {
			return fieldErr("spec.cloud_init.instance_id", "must be one line of at most 255 bytes, without control characters")
		}
		if len(c.Hostname) > 63 || strings.ContainsFunc(c.Hostname, func(r rune) bool { return r == ' ' || isControl(r) }) {
			return fieldErr("spec.cloud_init.hostname", "must be one word of at most 63 bytes, without spaces or control characters (NUL, line breaks, tabs, escapes)")
		}
	}
	if err := ValidateLabels(s.Labels); err != nil {
		return err
	}
	if k := s.SSH; k != nil {
		if strings.ContainsAny(k.User, "\n\r :") || len(k.User) > 32 {
			return fieldErr("spec.ssh.user", "%q is not a valid user name", k.User)
		}
		if strings.ContainsAny(k.PublicKey, "\n\r") || len(k.PublicKey) > 16<<10 {
			return fieldErr("spec.ssh.public_key", "must be one line of at most 16 KiB")
		}
	}
	return nil
}

// ValidateLabels checks a spec's labels: at most MaxLabels; each key
// matches LabelKeyPattern in at most MaxLabelKeyLen characters; each value
// is valid UTF-8 of at most MaxLabelValueLen characters without control
// characters (it may be empty). Keys are checked in sorted order, so the
// error names the same label every time; it names the label and the rule.
func ValidateLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return fieldErr("spec.labels", "%d labels are too many (at most %d)", len(labels), MaxLabels)
	}
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if err := ValidateLabel(k, labels[k]); err != nil {
			return err
		}
	}
	return nil
}

// ValidateLabel checks one label (see ValidateLabels).
func ValidateLabel(key, value string) error {
	switch {
	case key == "":
		return fieldErr("spec.labels", "a label key must not be empty")
	case len(key) > MaxLabelKeyLen:
		return fieldErr("spec.labels", "key %q: %d characters is too long (at most %d)", key, len(key), MaxLabelKeyLen)
	case !labelKeyRE.MatchString(key):
		return fieldErr("spec.labels", "key %q must match %s (letters, digits, '.', '_', '-' and at most one '/'; start and end with a letter or digit, on both sides of the '/')", key, LabelKeyPattern)
	}
	field := "spec.labels." + key
	switch {
	case !utf8.ValidString(value):
		return fieldErr(field, "value must be valid UTF-8")
	case utf8.RuneCountInString(value) > MaxLabelValueLen:
		return fieldErr(field, "value: %d characters is too long (at most %d)", utf8.RuneCountInString(value), MaxLabelValueLen)
	case strings.ContainsFunc(value, isControl):
		return fieldErr(field, "value %q must not contain control characters (NUL, line breaks, tabs, escapes)", value)
	case strings.ContainsFunc(value, isInvisible):
		return fieldErr(field, "value %q must not contain invisible or direction-changing characters (U+200B, U+200E, U+200F, U+202A-U+202E, U+2060-U+2069, U+FEFF), which make a listing read other than it is", value)
	}
	return nil
}

// isControl is a C0 or C1 control character or DEL.
func isControl(r rune) bool { return r < 0x20 || (r >= 0x7f && r <= 0x9f) }

// isInvisible is a zero-width space or word joiner, a byte order mark, or
// a bidirectional mark, embedding, override or isolate: text with them
// prints other than it reads (labels shown in a terminal). The zero-width
// non-joiner and joiner (U+200C, U+200D) are allowed: scripts and emoji
// need them.
func isInvisible(r rune) bool {
	return r == 0x200b || r == 0x200e || r == 0x200f || (r >= 0x202a && r <= 0x202e) || (r >= 0x2060 && r <= 0x2069) || r == 0xfeff
}

// Interface and datalink names: not starting with '-', which ip(8) and
// dladm(8) would take for an option (a bridge named -help).
var (
	ifNameRE   = regexp.MustCompile(`^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,14}$`)
	linkNameRE = regexp.MustCompile(`^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,30}$`)
)

func validateIfName(field, s string) error {
	if !ifNameRE.MatchString(s) || s == "." || s == ".." {
		return fieldErr(field, "%q is not a valid interface name (1-15 of A-Z a-z 0-9 _ . -, not starting with -)", s)
	}
	return nil
}

func validateLinkName(field, s string) error {
	if !linkNameRE.MatchString(s) || s == "." || s == ".." {
		return fieldErr(field, "%q is not a valid datalink name (1-31 of A-Z a-z 0-9 _ . -, not starting with -)", s)
	}
	return nil
}

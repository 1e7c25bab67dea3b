package qemu

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"

	"github.com/kdomanski/iso9660"

	"github.com/vmherd/vmherd/internal/vm"
)

// seedVolumeID is the label cloud-init's NoCloud datasource looks for.
const seedVolumeID = "cidata"

// seedFiles returns the NoCloud files for a spec, in ISO order.
func seedFiles(spec vm.VmSpec) []seedEntry {
	ci := vm.CloudInitConfig{}
	if spec.CloudInit != nil {
		ci = *spec.CloudInit
	}
	iid := ci.InstanceID
	if iid == "" {
		iid = spec.Name
	}
	host := ci.Hostname
	if host == "" {
		host = spec.Name
	}
	meta := "instance-id: " + yamlScalar(iid) + "\nlocal-hostname: " + yamlScalar(host) + "\n"
	user := ci.UserData
	if user == "" {
		user = defaultUserData(spec.SSH)
	}
	out := []seedEntry{{"meta-data", meta}, {"user-data", user}}
	if ci.NetworkConfig != "" {
		out = append(out, seedEntry{"network-config", ci.NetworkConfig})
	}
	return out
}

type seedEntry struct{ name, data string }

// defaultUserData creates spec.ssh.user with the public key, or is an empty
// cloud-config when the spec has no SSH user.
func defaultUserData(s *vm.SshConfig) string {
	if s == nil || s.User == "" {
		return "#cloud-config\n{}\n"
	}
	var b strings.Builder
	b.WriteString("#cloud-config\nusers:\n")
	b.WriteString("  - name: " + yamlScalar(s.User) + "\n")
	if s.PublicKey != "" {
		b.WriteString("    ssh_authorized_keys:\n")
		b.WriteString("      - " + yamlScalar(s.PublicKey) + "\n")
	}
	b.WriteString("    sudo: " + yamlScalar("ALL=(ALL) NOPASSWD:ALL") + "\n")
	b.WriteString("    shell: /bin/bash\n")
	return b.String()
}

var plainYAML = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._/-]*$`)

// yamlScalar writes s plain when that is unambiguous, else as a JSON string
// (JSON strings are YAML double-quoted scalars).
func yamlScalar(s string) string {
	if plainYAML.MatchString(s) && !yamlKeyword(s) {
		return s
	}
	b, _ := json.Marshal(s)
	return string(b)
}

func yamlKeyword(s string) bool {
	switch strings.ToLower(s) {
	case "true", "false", "yes", "no", "on", "off", "null", "y", "n", "~":
		return true
	}
	return false
}

// writeSeedISO writes the NoCloud seed image.
func writeSeedISO(path string, spec vm.VmSpec) error {
	w, err := iso9660.NewWriter()
	if err != nil {
		return fmt.Errorf("creating seed ISO: %w", err)
	}
	defer w.Cleanup()
	for _, f := range seedFiles(spec) {
		if err := w.AddFile(strings.NewReader(f.data), f.name); err != nil {
			return fmt.Errorf("adding %s to the seed ISO: %w", f.name, err)
		}
	}
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := w.WriteTo(out, seedVolumeID); err != nil {
		out.Close()
		return fmt.Errorf("writing seed ISO %s: %w", path, err)
	}
	return out.Close()
}

// Package cloudinit builds the NoCloud seed a guest reads at boot: an ISO
// 9660 image labelled "cidata" holding meta-data, user-data and, if given,
// network-config. The QEMU backend attaches it as a CD-ROM; the Propolis
// backend sends it inline as a blob disk.
package cloudinit

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

	"github.com/vmherd/vmherd/api"

	"github.com/kdomanski/iso9660"
)

// VolumeLabel is the label cloud-init's NoCloud datasource looks for.
const VolumeLabel = "cidata"

// File is one file of the seed.
type File struct{ Name, Data string }

// Files returns the seed's files for a spec, in ISO order. meta-data has
// instance-id and local-hostname (both default to the VM name); user-data is
// the spec's, else a #cloud-config creating the spec's SSH user with its key.
func Files(spec api.VmSpec) []File {
	var ci api.CloudInitConfig
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
		user = sshUserData(spec.SSH)
	}
	out := []File{{"meta-data", meta}, {"user-data", user}}
	if ci.NetworkConfig != "" {
		out = append(out, File{"network-config", ci.NetworkConfig})
	}
	return out
}

// sshUserData creates the SSH user with the public key, or is an empty
// cloud-config when the spec has no SSH user.
func sshUserData(s *api.SshConfig) string {
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

// Write writes the seed ISO for spec to w.
func Write(w io.Writer, spec api.VmSpec) error {
	iw, err := iso9660.NewWriter()
	if err != nil {
		return fmt.Errorf("building the cloud-init seed: %w", err)
	}
	defer func() { _ = iw.Cleanup() }()
	for _, f := range Files(spec) {
		if err := iw.AddFile(strings.NewReader(f.Data), f.Name); err != nil {
			return fmt.Errorf("building the cloud-init seed: adding %s: %w", f.Name, err)
		}
	}
	if err := iw.WriteTo(w, VolumeLabel); err != nil {
		return fmt.Errorf("building the cloud-init seed: %w", err)
	}
	return nil
}

// ISO returns the seed image for spec.
func ISO(spec api.VmSpec) ([]byte, error) {
	var buf bytes.Buffer
	if err := Write(&buf, spec); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteFile writes the seed image for spec to path.
func WriteFile(path string, spec api.VmSpec) error {
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("writing the cloud-init seed: %w", err)
	}
	if err := Write(out, spec); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

package propolis

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/kdomanski/iso9660"

	"github.com/vmherd/vmherd/internal/vm"
)

// seedLabel is the volume label cloud-init's NoCloud datasource looks for.
const seedLabel = "cidata"

// seedFile is one file of the NoCloud seed.
type seedFile struct{ name, data string }

// seedFiles returns the NoCloud meta-data, user-data and (if given)
// network-config of a VM. Without user-data, the SSH user of the spec is
// created with its key.
func seedFiles(spec vm.VmSpec) []seedFile {
	var ci vm.CloudInitConfig
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
	files := []seedFile{
		{"meta-data", "instance-id: " + quote(iid) + "\nlocal-hostname: " + quote(host) + "\n"},
		{"user-data", ci.UserData},
	}
	if files[1].data == "" {
		files[1].data = sshUserData(spec.SSH)
	}
	if ci.NetworkConfig != "" {
		files = append(files, seedFile{"network-config", ci.NetworkConfig})
	}
	return files
}

// quote writes s as a JSON string, which YAML reads as a double-quoted scalar.
func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func sshUserData(s *vm.SshConfig) string {
	if s == nil || s.User == "" {
		return "#cloud-config\n{}\n"
	}
	var b strings.Builder
	b.WriteString("#cloud-config\nusers:\n  - name: " + quote(s.User) + "\n")
	if s.PublicKey != "" {
		b.WriteString("    ssh_authorized_keys:\n      - " + quote(s.PublicKey) + "\n")
	}
	b.WriteString("    sudo: " + quote("ALL=(ALL) NOPASSWD:ALL") + "\n    shell: /bin/sh\n")
	return b.String()
}

// seedISO builds the NoCloud seed image (ISO 9660, label "cidata").
func seedISO(spec vm.VmSpec) ([]byte, error) {
	w, err := iso9660.NewWriter()
	if err != nil {
		return nil, fmt.Errorf("building the cloud-init seed: %w", err)
	}
	defer func() { _ = w.Cleanup() }()
	for _, f := range seedFiles(spec) {
		if err := w.AddFile(strings.NewReader(f.data), f.name); err != nil {
			return nil, fmt.Errorf("building the cloud-init seed: adding %s: %w", f.name, err)
		}
	}
	var buf bytes.Buffer
	if err := w.WriteTo(&buf, seedLabel); err != nil {
		return nil, fmt.Errorf("building the cloud-init seed: %w", err)
	}
	return buf.Bytes(), nil
}

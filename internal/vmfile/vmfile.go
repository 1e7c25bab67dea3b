// Package vmfile reads VMFile.kdl, the declarative VM definitions of
// CloudNebulaProject/vm-manager's vmctl, in its own format, plus the
// nodes it lacks (uefi, host, backend), for `vmctl up`, `down`, `reload`
// and `provision`. KDL is parsed by github.com/sblinch/kdl-go.
//
//	vm "web" {
//	    image "debian-12"            // a name in the hosts' image stores, or a path (with a /)
//	    image-url "https://…"        // or pulled first (http(s):// or oci://)
//	    vcpus 2
//	    memory 1024                  // MiB
//	    disk 10                      // GiB
//	    uefi true
//	    host "h1"                    // pin to a host
//	    backend "qemu"
//	    network "user" | "tap" bridge="br0" | "vnic" name="vnic0" | "none"
//	    cloud-init { hostname "web"; ssh-key "~/.ssh/id_ed25519.pub"; user-data "./user-data.yaml" }
//	    ssh { user "vm"; private-key "~/.ssh/id_ed25519" }
//	    labels { team "ci"; "ci.example.com/job" "1234" }  // metadata only: vmctl list --label
//	    provision "shell" { inline "apt-get install -y nginx" }
//	    provision "shell" { script "./setup.sh" }
//	    provision "file" { source "./nginx.conf"; destination "/etc/nginx/nginx.conf" }
//	}
//
// Paths are relative to the VMFile's directory; ~ is the user's home.
// Parse resolves them lexically; Check then confines the local files to
// the VMFile's directory (and what the user allows on the command line)
// and keeps secret-looking files out of specs and guests.
// Unknown nodes are errors that name the node and list the known ones.
package vmfile

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vmherd/vmherd/api"

	"github.com/sblinch/kdl-go"
	"github.com/sblinch/kdl-go/document"
)

// File is a parsed VMFile.
type File struct {
	Path string // the file (its directory resolves relative paths)
	VMs  []Def
}

// Def is one vm block.
type Def struct {
	Name      string
	Image     string // a store name, or a path (with a /, or ~)
	ImageURL  string // http(s):// or oci://
	Vcpus     int
	MemoryMB  int
	DiskGB    int
	UEFI      bool
	Host      string
	Backend   string
	Network   api.NetworkConfig
	CloudInit *CloudInit
	SSH       *SSH
	// Labels are the VM's labels (api.ValidateLabels): metadata for
	// `vmctl list --label`, never given to the guest.
	Labels    map[string]string
	Provision []Step
}

// CloudInit is the cloud-init block (paths resolved).
type CloudInit struct {
	Hostname string
	SSHKey   string // a public key file
	UserData string // a user-data file
}

// SSH is the ssh block: who provisioning logs in as, with which key
// (PrivateKey "" : a key generated for the VM).
type SSH struct {
	User       string
	PrivateKey string
}

// Step is one provision block.
type Step struct {
	Kind        string // "shell" or "file"
	Inline      string
	Script      string // a local file, run on the guest
	Source      string // a local file, copied with its mode
	Destination string
}

// Describe is a step in a line, for progress and errors.
func (s Step) Describe() string {
	switch {
	case s.Kind == "file":
		return fmt.Sprintf("file %s -> %s", s.Source, s.Destination)
	case s.Script != "":
		return "shell script " + s.Script
	}
	in := s.Inline
	if len(in) > 60 {
		in = in[:57] + "..."
	}
	return fmt.Sprintf("shell %q", in)
}

// Defaults of a vm block.
const (
	DefaultVcpus    = 1
	DefaultMemoryMB = 1024
)

// Parse reads and checks the VMFile at path.
func Parse(path string) (*File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	f, err := ParseBytes(b, abs)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// ParseBytes parses a VMFile's content; path resolves relative paths.
func ParseBytes(b []byte, path string) (*File, error) {
	doc, err := kdl.Parse(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	f := &File{Path: path}
	seen := map[string]bool{}
	for _, n := range doc.Nodes {
		if name(n) != "vm" {
			return nil, unknown("", n, []string{"vm"})
		}
		d, err := f.parseVM(n)
		if err != nil {
			return nil, err
		}
		if seen[d.Name] {
			return nil, fmt.Errorf("vm %q is defined twice (hint: each vm needs a name of its own)", d.Name)
		}
		seen[d.Name] = true
		f.VMs = append(f.VMs, d)
	}
	if len(f.VMs) == 0 {
		return nil, errors.New(`no vm definitions (hint: vm "name" { image "…" })`)
	}
	return f, nil
}

// Find returns the definition named name.
func (f *File) Find(name string) (*Def, bool) {
	for i := range f.VMs {
		if f.VMs[i].Name == name {
			return &f.VMs[i], true
		}
	}
	return nil, false
}

func name(n *document.Node) string { return n.Name.ValueString() }

func unknown(where string, n *document.Node, known []string) error {
	w := ""
	if where != "" {
		w = " in " + where
	}
	return fmt.Errorf("unknown node %q%s (hint: the nodes here are %s)", name(n), w, strings.Join(known, ", "))
}

var vmNodes = []string{"image", "image-url", "vcpus", "memory", "disk", "uefi", "host", "backend", "network", "cloud-init", "ssh", "labels", "provision"}

func (f *File) parseVM(n *document.Node) (Def, error) {
	d := Def{Vcpus: DefaultVcpus, MemoryMB: DefaultMemoryMB, Network: api.NetworkConfig{Type: api.NetworkUser}}
	nm, err := stringArg(n, "vm")
	if err != nil {
		return d, fmt.Errorf(`%w (hint: vm "my-server" { … })`, err)
	}
	if err := api.ValidateName(nm); err != nil {
		return d, fmt.Errorf("vm %q: %w", nm, err)
	}
	d.Name = nm
	where := fmt.Sprintf("vm %q", nm)
	bad := func(err error) (Def, error) { return d, fmt.Errorf("%s: %w", where, err) }
	seen := map[string]bool{}
	for _, c := range n.Children {
		cn := name(c)
		if cn != "provision" {
			if seen[cn] {
				return bad(fmt.Errorf("%s is given twice", cn))
			}
			seen[cn] = true
		}
		switch cn {
		case "image":
			d.Image, err = stringArg(c, cn)
		case "image-url":
			d.ImageURL, err = stringArg(c, cn)
			if err == nil && !strings.HasPrefix(d.ImageURL, "http://") && !strings.HasPrefix(d.ImageURL, "https://") && !strings.HasPrefix(d.ImageURL, "oci://") {
				err = fmt.Errorf("image-url %q: want http(s)://… or oci://…", d.ImageURL)
			}
		case "vcpus":
			d.Vcpus, err = intArg(c, cn)
		case "memory":
			d.MemoryMB, err = intArg(c, cn)
		case "disk":
			d.DiskGB, err = intArg(c, cn)
		case "uefi":
			d.UEFI, err = boolArg(c, cn)
		case "host":
			d.Host, err = stringArg(c, cn)
		case "backend":
			d.Backend, err = stringArg(c, cn)
		case "network":
			err = parseNetwork(c, &d.Network)
		case "cloud-init":
			d.CloudInit, err = f.parseCloudInit(c)
		case "ssh":
			d.SSH, err = f.parseSSH(c)
		case "labels":
			d.Labels, err = parseLabels(c)
		case "provision":
			var s Step
			s, err = f.parseStep(c)
			d.Provision = append(d.Provision, s)
		default:
			err = unknown("", c, vmNodes)
		}
		if err != nil {
			return bad(err)
		}
	}
	switch {
	case d.Image == "" && d.ImageURL == "" && d.Backend != string(api.BackendNoop):
		return bad(errors.New(`no image (hint: image "debian-12", image "/path/to/disk.qcow2" or image-url "https://…")`))
	case d.Image != "" && d.ImageURL != "":
		return bad(errors.New("both image and image-url (hint: give one)"))
	}
	if d.Image != "" && isPath(d.Image) {
		d.Image = f.resolve(d.Image)
	}
	return d, nil
}

// isPath tells a path from a store name: a path has a / or starts with ~.
func isPath(s string) bool { return strings.ContainsRune(s, '/') || strings.HasPrefix(s, "~") }

func parseNetwork(n *document.Node, net *api.NetworkConfig) error {
	t, err := stringArg(n, "network")
	if err != nil {
		return err
	}
	net.Type = api.NetworkType(t)
	allowed := map[api.NetworkType][]string{api.NetworkUser: nil, api.NetworkTap: {"bridge"}, api.NetworkVnic: {"name", "link"}, api.NetworkNone: nil}
	props, ok := allowed[net.Type]
	if !ok {
		return fmt.Errorf(`network %q: unknown type (hint: "user", "tap" bridge="br0", "vnic" name="vnic0" or "none")`, t)
	}
	for k, v := range n.Properties.Unordered() {
		if !slices.Contains(props, k) {
			return fmt.Errorf("network %q has no property %s (hint: it takes %v)", t, k, props)
		}
		s, ok := v.ResolvedValue().(string)
		if !ok {
			return fmt.Errorf("network %s=: want a string", k)
		}
		switch k {
		case "bridge":
			net.Bridge = s
		case "name":
			net.Name = s
		case "link":
			net.Link = s
		}
	}
	return nil
}

// parseLabels reads a labels block: one child per label, its name the
// key and its one string argument the value.
func parseLabels(n *document.Node) (map[string]string, error) {
	if len(n.Arguments) > 0 || len(n.Properties) > 0 {
		return nil, errors.New(`labels takes a block, not values (hint: labels { team "ci" })`)
	}
	out := map[string]string{}
	for _, c := range n.Children {
		k := name(c)
		if _, dup := out[k]; dup {
			return nil, fmt.Errorf("labels: %s is given twice", k)
		}
		v, err := stringArg(c, k)
		if err != nil {
			return nil, fmt.Errorf(`labels: %w (hint: labels { team "ci" })`, err)
		}
		if err := api.ValidateLabel(k, v); err != nil {
			return nil, fmt.Errorf("labels: %w", err)
		}
		out[k] = v
	}
	if err := api.ValidateLabels(out); err != nil {
		return nil, fmt.Errorf("labels: %w", err)
	}
	return out, nil
}

func (f *File) parseCloudInit(n *document.Node) (*CloudInit, error) {
	ci := &CloudInit{}
	for _, c := range n.Children {
		var err error
		switch name(c) {
		case "hostname":
			ci.Hostname, err = stringArg(c, "hostname")
		case "ssh-key":
			ci.SSHKey, err = stringArg(c, "ssh-key")
			ci.SSHKey = f.resolve(ci.SSHKey)
		case "user-data":
			ci.UserData, err = stringArg(c, "user-data")
			ci.UserData = f.resolve(ci.UserData)
		default:
			err = unknown("cloud-init", c, []string{"hostname", "ssh-key", "user-data"})
		}
		if err != nil {
			return nil, fmt.Errorf("cloud-init: %w", err)
		}
	}
	return ci, nil
}

func (f *File) parseSSH(n *document.Node) (*SSH, error) {
	s := &SSH{User: "vm"}
	for _, c := range n.Children {
		var err error
		switch name(c) {
		case "user":
			s.User, err = stringArg(c, "user")
		case "private-key":
			s.PrivateKey, err = stringArg(c, "private-key")
			s.PrivateKey = f.resolve(s.PrivateKey)
		default:
			err = unknown("ssh", c, []string{"user", "private-key"})
		}
		if err != nil {
			return nil, fmt.Errorf("ssh: %w", err)
		}
	}
	return s, nil
}

func (f *File) parseStep(n *document.Node) (Step, error) {
	kind, err := stringArg(n, "provision")
	if err != nil {
		return Step{}, fmt.Errorf(`%w (hint: provision "shell" { inline "…" } or provision "file" { source "…"; destination "…" })`, err)
	}
	s := Step{Kind: kind}
	var known []string
	switch kind {
	case "shell":
		known = []string{"inline", "script"}
	case "file":
		known = []string{"source", "destination"}
	default:
		return s, fmt.Errorf(`provision %q: unknown kind (hint: "shell" or "file")`, kind)
	}
	for _, c := range n.Children {
		cn := name(c)
		if !slices.Contains(known, cn) {
			return s, unknown(fmt.Sprintf("provision %q", kind), c, known)
		}
		v, err := stringArg(c, cn)
		if err != nil {
			return s, fmt.Errorf("provision %q: %w", kind, err)
		}
		switch cn {
		case "inline":
			s.Inline = v
		case "script":
			s.Script = f.resolve(v)
		case "source":
			s.Source = f.resolve(v)
		case "destination":
			s.Destination = v
		}
	}
	switch {
	case kind == "shell" && (s.Inline == "") == (s.Script == ""):
		return s, errors.New(`provision "shell" needs exactly one of inline or script (hint: inline "command" or script "./setup.sh")`)
	case kind == "file" && (s.Source == "" || s.Destination == ""):
		return s, errors.New(`provision "file" needs source and destination (hint: source "./app.conf"; destination "/etc/app.conf")`)
	case kind == "file" && !strings.HasPrefix(s.Destination, "/"):
		return s, fmt.Errorf("provision \"file\": destination %q must be an absolute path on the guest", s.Destination)
	}
	return s, nil
}

// resolve makes a path absolute: ~ is the home directory, relative paths
// are relative to the VMFile's directory.
func (f *File) resolve(p string) string {
	if p == "~" || strings.HasPrefix(p, "~/") {
		if home, err := os.UserHomeDir(); err == nil {
			p = filepath.Join(home, strings.TrimPrefix(p, "~"))
		}
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(filepath.Dir(f.Path), p)
	}
	return filepath.Clean(p)
}

func stringArg(n *document.Node, what string) (string, error) {
	if len(n.Arguments) != 1 {
		return "", fmt.Errorf("%s takes one value, not %d", what, len(n.Arguments))
	}
	s, ok := n.Arguments[0].ResolvedValue().(string)
	if !ok {
		return "", fmt.Errorf("%s: want a string, not %v", what, n.Arguments[0].ResolvedValue())
	}
	if what != "network" && what != "provision" && what != "vm" && (len(n.Properties) > 0 || len(n.Children) > 0) {
		return "", fmt.Errorf("%s takes no properties or children", what)
	}
	return s, nil
}

func intArg(n *document.Node, what string) (int, error) {
	if len(n.Arguments) != 1 || len(n.Properties) > 0 || len(n.Children) > 0 {
		return 0, fmt.Errorf("%s takes one number", what)
	}
	switch v := n.Arguments[0].ResolvedValue().(type) {
	case int64:
		return int(v), nil
	case int:
		return v, nil
	}
	return 0, fmt.Errorf("%s: want a whole number, not %v", what, n.Arguments[0].ResolvedValue())
}

func boolArg(n *document.Node, what string) (bool, error) {
	if len(n.Arguments) == 0 {
		return true, nil // a bare `uefi` means true
	}
	if len(n.Arguments) != 1 {
		return false, fmt.Errorf("%s takes one value", what)
	}
	b, ok := n.Arguments[0].ResolvedValue().(bool)
	if !ok {
		return false, fmt.Errorf("%s: want true or false, not %v", what, n.Arguments[0].ResolvedValue())
	}
	return b, nil
}

package vmfile_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/vmfile"
)

func TestParseExample(t *testing.T) {
	f, err := vmfile.Parse("testdata/VMFile.kdl")
	if err != nil {
		t.Fatal(err)
	}
	dir, _ := filepath.Abs("testdata")
	home, _ := os.UserHomeDir()
	if len(f.VMs) != 2 {
		t.Fatalf("%d vms", len(f.VMs))
	}
	web := f.VMs[0]
	if web.Name != "web" || web.ImageURL != "https://example.com/images/debian-12-generic-amd64.qcow2" || web.Vcpus != 2 || web.MemoryMB != 2048 || web.DiskGB != 20 {
		t.Errorf("web: %+v", web)
	}
	if web.Network != (api.NetworkConfig{Type: api.NetworkTap, Bridge: "br0"}) {
		t.Errorf("web network: %+v", web.Network)
	}
	if web.CloudInit == nil || web.CloudInit.Hostname != "web" || web.CloudInit.SSHKey != filepath.Join(dir, "keys/id_ed25519.pub") {
		t.Errorf("web cloud-init: %+v", web.CloudInit)
	}
	if web.SSH == nil || web.SSH.User != "vm" || web.SSH.PrivateKey != "" {
		t.Errorf("web ssh: %+v", web.SSH)
	}
	if len(web.Labels) != 2 || web.Labels["team"] != "web" || web.Labels["ci.example.com/job"] != "1234" {
		t.Errorf("web labels: %v", web.Labels)
	}
	want := []vmfile.Step{
		{Kind: "shell", Inline: "echo hello > /tmp/hello"},
		{Kind: "file", Source: filepath.Join(dir, "files/motd"), Destination: "/etc/motd"},
		{Kind: "shell", Script: filepath.Join(dir, "scripts/setup.sh")},
	}
	if len(web.Provision) != len(want) {
		t.Fatalf("steps: %+v", web.Provision)
	}
	for i := range want {
		if web.Provision[i] != want[i] {
			t.Errorf("step %d: %+v, want %+v", i, web.Provision[i], want[i])
		}
	}
	db := f.VMs[1]
	if db.Image != "debian-12" || !db.UEFI || db.Host != "h1" || db.Backend != "qemu" || db.Vcpus != 1 || db.MemoryMB != 1024 ||
		db.SSH.User != "root" || db.SSH.PrivateKey != filepath.Join(home, ".ssh/id_ed25519") || db.Network.Type != api.NetworkUser {
		t.Errorf("db: %+v %+v", db, db.SSH)
	}
}

func TestParseErrors(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{``, "no vm definitions"},
		{`box "x" { }`, `unknown node "box"`},
		{`vm "a" { image "x"; colour "red" }`, `unknown node "colour" (hint: the nodes here are image, image-url`},
		{`vm "a" { image "x"; cloud-init { hostnme "a" } }`, `unknown node "hostnme" in cloud-init`},
		{`vm "a" { image "x"; ssh { usr "a" } }`, `unknown node "usr" in ssh`},
		{`vm "a" { vcpus 1 }`, "no image"},
		{`vm "a" { image "x"; image-url "https://a/b" }`, "both image and image-url"},
		{`vm "a" { image-url "ftp://a/b" }`, "want http(s)"},
		{`vm "a" { image "x"; network "bridge" }`, "unknown type"},
		{`vm "a" { image "x"; network "tap" name="x" }`, "has no property name"},
		{`vm "a" { image "x"; memory "lots" }`, "want a whole number"},
		{`vm "a" { image "x"; memory 1; memory 2 }`, "memory is given twice"},
		{`vm "a" { image "x"; labels { "-x" "1" } }`, `labels: spec.labels: key "-x" must match`},
		{`vm "a" { image "x"; labels { team "a"; team "b" } }`, "labels: team is given twice"},
		{`vm "a" { image "x"; labels { team 1 } }`, "labels: team: want a string"},
		{`vm "a" { image "x"; labels "team=ci" }`, "labels takes a block"},
		{`vm "a" { image "x"; labels { team "a
b" } }`, "spec.labels.team: value"},
		{`vm "a" { image "x"; provision "shell" { } }`, "exactly one of inline or script"},
		{`vm "a" { image "x"; provision "shell" { inline "a"; script "b" } }`, "exactly one of inline or script"},
		{`vm "a" { image "x"; provision "file" { source "a" } }`, "needs source and destination"},
		{`vm "a" { image "x"; provision "file" { source "a"; destination "rel" } }`, "absolute path"},
		{`vm "a" { image "x"; provision "ansible" { } }`, "unknown kind"},
		{`vm "a" { image "x" }` + "\n" + `vm "a" { image "y" }`, "defined twice"},
		{`vm "Bad Name" { image "x" }`, "must match"},
	} {
		// KDL 1 ends a node before "}" with a newline or ";".
		in := strings.ReplaceAll(c.in, " }", "\n}")
		_, err := vmfile.ParseBytes([]byte(in), "/tmp/VMFile.kdl")
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want an error with %q", c.in, err, c.want)
		}
	}
}

package cloudinit

import (
	"bytes"
	"io"
	"reflect"
	"testing"

	"github.com/vmherd/vmherd/api"

	"github.com/kdomanski/iso9660"
)

func TestFiles(t *testing.T) {
	cases := []struct {
		spec api.VmSpec
		want map[string]string
	}{
		{api.VmSpec{Name: "web1"}, map[string]string{
			"meta-data": "instance-id: web1\nlocal-hostname: web1\n",
			"user-data": "#cloud-config\n{}\n",
		}},
		{api.VmSpec{Name: "web1", CloudInit: &api.CloudInitConfig{InstanceID: "iid: 1", Hostname: "yes", UserData: "#!/bin/sh\n", NetworkConfig: "version: 2\n"}}, map[string]string{
			"meta-data":      "instance-id: \"iid: 1\"\nlocal-hostname: \"yes\"\n",
			"user-data":      "#!/bin/sh\n",
			"network-config": "version: 2\n",
		}},
		{api.VmSpec{Name: "w", SSH: &api.SshConfig{User: "vm", PublicKey: "ssh-ed25519 AAAA k@h"}}, map[string]string{
			"meta-data": "instance-id: w\nlocal-hostname: w\n",
			"user-data": "#cloud-config\nusers:\n  - name: vm\n    ssh_authorized_keys:\n      - \"ssh-ed25519 AAAA k@h\"\n    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n    shell: /bin/bash\n",
		}},
	}
	for _, c := range cases {
		got := map[string]string{}
		for _, f := range Files(c.spec) {
			got[f.Name] = f.Data
		}
		if len(got) != len(c.want) {
			t.Errorf("%+v: files %q", c.spec, got)
		}
		for k, v := range c.want {
			if got[k] != v {
				t.Errorf("%s = %q, want %q", k, got[k], v)
			}
		}
	}
}

// The ISO is labelled cidata and holds the files.
func TestISO(t *testing.T) {
	b, err := ISO(api.VmSpec{Name: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	img, err := iso9660.OpenImage(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	label, err := img.Label()
	if err != nil || label != VolumeLabel {
		t.Fatalf("label %q, %v", label, err)
	}
	root, err := img.RootDir()
	if err != nil {
		t.Fatal(err)
	}
	kids, err := root.GetChildren()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]string{}
	for _, k := range kids {
		data, _ := io.ReadAll(k.Reader())
		found[k.Name()] = string(data)
	}
	if found["meta-data"] != "instance-id: web1\nlocal-hostname: web1\n" || found["user-data"] == "" {
		t.Fatalf("ISO files %q", found)
	}
}

// Labels are metadata for people: the seed the guest reads has the same
// files with them or without them, and no label in its image.
func TestLabelsNotInSeed(t *testing.T) {
	base := api.VmSpec{Name: "web1", SSH: &api.SshConfig{User: "vm", PublicKey: "ssh-ed25519 AAAA x"}}
	labelled := base
	labelled.Labels = map[string]string{"team": "secret-team-name", "ci.example.com/job": "1234"}
	if a, b := Files(base), Files(labelled); !reflect.DeepEqual(a, b) {
		t.Fatalf("the seed's files differ with labels:\n%v\n%v", a, b)
	}
	iso, err := ISO(labelled)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"secret-team-name", "ci.example.com/job", "team"} {
		if bytes.Contains(iso, []byte(s)) {
			t.Fatalf("the seed image holds %q", s)
		}
	}
}

package e2e_test

import (
	"context"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/backends/qemu"
	"github.com/vmherd/vmherd/internal/imagechain/corpus"
	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
	"github.com/vmherd/vmherd/internal/vmctl"
)

// treeState lists a tree's files with their sizes and times.
func treeState(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	if err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		out[p] = info.Mode().String() + " " + strconv.FormatInt(info.Size(), 10) + " " + info.ModTime().String()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// The image part of the hostile-input corpus (issue #22), through a real
// engine and a QEMU worker: every hostile image placed in an image root
// ends its prepare failed naming the reason, every hostile pull target
// ends failed naming the reason, the daemons stay up, and nothing is
// written outside the data dir.
func TestHostileImageCorpus(t *testing.T) {
	dir := t.TempDir()
	dataDir := filepath.Join(dir, "data")
	root, outside := filepath.Join(dir, "images"), filepath.Join(dir, "outside")
	for _, d := range []string{dataDir, root, outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	_, err := os.Stat("/usr/bin/qemu-system-x86_64")
	testenv.Require(t, err == nil, "qemu-system-x86_64 is not installed")
	cases := corpus.Images(t, "", root, outside)
	store := filepath.Join(dataDir, "images")
	roots := []string{store, root}
	q, err := qemu.New(qemu.Options{DataDir: dataDir, Host: "h1", Logger: testenv.Logger(), ImageRoots: roots})
	if err != nil {
		t.Fatal(err)
	}
	// The worker's own pull policy: the defaults (no private addresses).
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: q}, Default: api.BackendQEMU,
		ImageStore: store, ImageRoots: roots, VMDirs: []string{filepath.Join(dataDir, "vms")}})
	env.WaitHost(eng, "h1")
	beforeOutside, beforeRoot := treeState(t, outside), treeState(t, root)

	for i, c := range cases {
		name := "hostile" + strconv.Itoa(i)
		env.SendCmd(name, "prepare", "p"+strconv.Itoa(i), api.Command{Host: "h1", Spec: &api.VmSpec{Backend: api.BackendQEMU, ImagePath: c.Path, MemoryMB: 128}})
		ev := env.Result(name, "p"+strconv.Itoa(i), time.Minute)
		if ev.Type != api.TypeFailed || !strings.Contains(ev.Error, c.Want) {
			t.Errorf("%s: prepare ended %s: %q %q\nwant failed with %q", c.Name, ev.Type, ev.Error, ev.Reason, c.Want)
		}
		// A failed VM holds its capacity until destroyed (issue #22, item 8).
		env.SendCmd(name, "destroy", "d"+strconv.Itoa(i), api.Command{})
		env.Result(name, "d"+strconv.Itoa(i), time.Minute)
	}

	var hits int
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits++
		_, _ = w.Write(make([]byte, 1<<20))
	}))
	defer srv.Close()
	port := srv.URL[strings.LastIndexByte(srv.URL, ':')+1:]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pulls := []struct{ source, want string }{
		{srv.URL + "/metrics", "127.0.0.1 is a loopback address"},
		{"http://localhost:" + port + "/disk.raw", "is a loopback address"},
		{"http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"},
		{"http://10.0.0.1/disk.raw", "10.0.0.1 is a private address"},
		{"oci://127.0.0.1:" + port + "/vms/x:1", "127.0.0.1 is a loopback address"},
	}
	for _, p := range pulls {
		var out, errOut syncbuf.Buffer
		code := vmctl.Run(ctx, []string{"--server", env.URL, "image", "pull", p.source, "--name", "hostile", "--host", "h1"}, &out, &errOut)
		if code != vmctl.ExitFailed || !strings.Contains(errOut.String(), p.want) {
			t.Errorf("image pull %s: exit %d\n%s%s\nwant failed with %q", p.source, code, out.String(), errOut.String(), p.want)
		}
	}
	if hits != 0 {
		t.Errorf("the loopback server was reached %d times", hits)
	}

	// The daemons are up: the worker still prepares a VM from a good image.
	good := filepath.Join(root, "inside.raw")
	env.SendCmd("good1", "prepare", "g1", api.Command{Host: "h1", Spec: &api.VmSpec{Backend: api.BackendQEMU, ImagePath: good, MemoryMB: 128}})
	if ev := env.Result("good1", "g1", time.Minute); ev.Type != api.TypePrepared {
		t.Fatalf("a good prepare after the corpus: %s %q", ev.Type, ev.Error)
	}
	env.SendCmd("good1", "destroy", "g2", api.Command{})
	env.Result("good1", "g2", time.Minute)
	if !eng.Engine.Hosts().Alive("h1") {
		t.Error("h1 is not alive after the corpus")
	}
	// Nothing written outside the data dir.
	for _, chk := range []struct {
		what          string
		before, after map[string]string
	}{{"outside", beforeOutside, treeState(t, outside)}, {"the image root", beforeRoot, treeState(t, root)}} {
		for p, v := range chk.after {
			if chk.before[p] != v {
				t.Errorf("%s: %s changed or appeared", chk.what, p)
			}
		}
		if len(chk.after) != len(chk.before) {
			t.Errorf("%s: %d entries before, %d after", chk.what, len(chk.before), len(chk.after))
		}
	}
	t.Logf("corpus: %d hostile images, %d hostile pull targets", len(cases), len(pulls))
}

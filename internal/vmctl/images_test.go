package vmctl

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends/noop"
	"github.com/vmherd/vmherd/internal/images"
	"github.com/vmherd/vmherd/internal/testenv"
)

// vmctl image pull, list, inspect and rm through two workers' stores.
func TestImageCommands(t *testing.T) {
	t.Parallel()
	img := make([]byte, 3<<20)
	for i := range img {
		img[i] = byte(i * 7)
	}
	sum := sha256.Sum256(img)
	mux := http.NewServeMux()
	mux.HandleFunc("/debian-12.qcow2", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write(img) })
	srv := httptest.NewServer(mux)
	defer srv.Close()

	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	stores := map[string]string{}
	for _, h := range []string{"h1", "h2"} {
		stores[h] = filepath.Join(t.TempDir(), "images")
		env.StartWorker(testenv.WorkerConfig{Host: h, Noop: noop.New(noop.Options{}), ImageStore: stores[h], ImageRoots: []string{stores[h]},
			ImagePolicy: images.Policy{AllowPrivate: true}}) // the image server is on loopback
		env.WaitHost(eng, h)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// Two hosts alive: say which.
	if r := vmctl(t, ctx, env.URL, "image", "pull", srv.URL+"/debian-12.qcow2"); r.code != ExitUsage || !strings.Contains(r.err, "--all-hosts") {
		t.Fatalf("pull without a host: %s", r)
	}
	r := vmctl(t, ctx, env.URL, "image", "pull", srv.URL+"/debian-12.qcow2", "--all-hosts", "--sha256", hex.EncodeToString(sum[:]))
	if r.code != 0 || strings.Count(r.out, "ready") != 2 {
		t.Fatalf("pull --all-hosts: %s", r)
	}
	for h, dir := range stores {
		b, err := os.ReadFile(filepath.Join(dir, "blobs", "sha256", hex.EncodeToString(sum[:])))
		if err != nil || len(b) != len(img) {
			t.Fatalf("%s's store: %v (%d bytes)", h, err, len(b))
		}
	}
	// A bad pull: the worker says why, nothing is stored, list shows it failed.
	r = vmctl(t, ctx, env.URL, "image", "pull", srv.URL+"/missing.qcow2", "--host", "h1")
	if r.code != ExitFailed || !strings.Contains(r.err, "404") {
		t.Fatalf("pull of a missing URL: %s", r)
	}
	r = vmctl(t, ctx, env.URL, "image", "list")
	if r.code != 0 || strings.Count(r.out, "debian-12 ") != 2 || !strings.Contains(r.out, "failed") {
		t.Fatalf("image list: %s", r)
	}
	r = vmctl(t, ctx, env.URL, "image", "inspect", "debian-12")
	var sts []api.ImageStatus
	if r.code != 0 || json.Unmarshal([]byte(r.out), &sts) != nil || len(sts) != 2 || sts[0].Digest != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Fatalf("image inspect: %s", r)
	}

	// A VM on h1 uses the image: h1 refuses to remove it; h2 removes it.
	env.SendCmd("web1", "prepare", "p1", api.Command{Host: "h1", Spec: &api.VmSpec{Backend: api.BackendNoop, ImagePath: sts[0].Path}})
	if ev := env.Result("web1", "p1", 30*time.Second); ev.Type != api.TypePrepared {
		t.Fatalf("prepare with the pulled image: %+v", ev)
	}
	if r = vmctl(t, ctx, env.URL, "image", "rm", "debian-12", "--host", "h1"); r.code == 0 || !strings.Contains(r.err, "in use") {
		t.Fatalf("rm of an image in use: %s", r)
	}
	if r = vmctl(t, ctx, env.URL, "image", "rm", "debian-12", "--host", "h2"); r.code != 0 {
		t.Fatalf("rm on h2: %s", r)
	}
	if _, err := os.Stat(filepath.Join(stores["h2"], "blobs", "sha256", hex.EncodeToString(sum[:]))); !os.IsNotExist(err) {
		t.Fatalf("h2's image file after rm: %v", err)
	}
	r = vmctl(t, ctx, env.URL, "image", "list", "--host", "h2")
	if r.code != 0 || strings.Contains(r.out, "debian-12") {
		t.Fatalf("h2's list after rm: %s", r)
	}
}

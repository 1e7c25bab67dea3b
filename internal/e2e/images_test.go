package e2e_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/internal/backends"
	"github.com/vmherd/vmherd/internal/guestimage"
	"github.com/vmherd/vmherd/internal/images"
	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/testenv/syncbuf"
	"github.com/vmherd/vmherd/internal/vmctl"
)

// An image pulled over HTTP into the worker's store boots a QEMU VM that
// names it (spec.image), and cannot be removed while the VM exists.
func TestQEMUNamedImage(t *testing.T) {
	env, image, srv := imageStoreEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	run := func(args ...string) (string, int) {
		var out, errOut syncbuf.Buffer
		code := vmctl.Run(ctx, append([]string{"--server", env.URL}, args...), &out, &errOut)
		return out.String() + errOut.String(), code
	}
	if out, code := run("image", "pull", srv.URL+"/"+filepath.Base(image), "--name", "guest"); code != 0 || !strings.Contains(out, "ready") {
		t.Fatalf("image pull: exit %d\n%s", code, out)
	}
	// Not on a host without it: the only host has it, so it lands there.
	if out, code := run("create", "q1", "--backend", "qemu", "--image", "fedora-41", "--memory", "256"); code != vmctl.ExitFailed || !strings.Contains(out, "no image fedora-41") {
		t.Fatalf("create with an image no host has: exit %d\n%s", code, out)
	}
	if out, code := run("create", "q1", "--backend", "qemu", "--image", "guest", "--memory", "256", "--start"); code != 0 {
		t.Fatalf("create with the pulled image: exit %d\n%s", code, out)
	}
	env.WaitFor("the guest booted from the pulled image", bootWait, func() bool {
		return strings.Contains(consoleLog(t, env, "q1"), guestimage.ReadyMarker)
	})
	if out, code := run("image", "rm", "guest"); code == 0 || !strings.Contains(out, "in use") {
		t.Fatalf("rm of the image q1 uses: exit %d\n%s", code, out)
	}
	if out, code := run("destroy", "q1"); code != 0 {
		t.Fatalf("destroy: exit %d\n%s", code, out)
	}
	if out, code := run("image", "rm", "guest"); code != 0 {
		t.Fatalf("rm after destroy: exit %d\n%s", code, out)
	}
}

// imageStoreEnv is an engine and a QEMU worker h1 with an image store, and
// an HTTP server of the test guest's image (srv.URL + "/" + its base name).
func imageStoreEnv(t *testing.T) (*testenv.Env, string, *httptest.Server) {
	t.Helper()
	image := guestimage.EnsureForTest(t)
	dataDir := t.TempDir()
	q := newQEMU(t, dataDir)
	srv := httptest.NewServer(http.FileServer(http.Dir(filepath.Dir(image))))
	t.Cleanup(srv.Close)
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	store := filepath.Join(dataDir, "images")
	env.StartWorker(testenv.WorkerConfig{Host: "h1", Extra: map[api.BackendTag]backends.Hypervisor{api.BackendQEMU: q}, Default: api.BackendQEMU,
		ImageStore: store, ImageRoots: []string{store}, VMDirs: []string{filepath.Join(dataDir, "vms")},
		ImagePolicy: images.Policy{AllowPrivate: true}}) // the image server is on loopback
	env.WaitHost(eng, "h1")
	return env, image, srv
}

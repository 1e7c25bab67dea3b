package images_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vmherd/vmherd/api"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"

	"github.com/vmherd/vmherd/internal/images"
)

// disk is a fake disk image of n bytes.
func disk(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31 + i/251)
	}
	return b
}

func sum(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

// stored lists the files under the store's blobs and .partial.
func stored(t *testing.T, root string) (blobs, partial int) {
	t.Helper()
	for dir, n := range map[string]*int{filepath.Join(root, "blobs", "sha256"): &blobs, filepath.Join(root, ".partial"): &partial} {
		ents, _ := os.ReadDir(dir)
		*n = len(ents)
	}
	return
}

func TestPullHTTP(t *testing.T) {
	img := disk(3 << 20)
	var zst bytes.Buffer
	enc, _ := zstd.NewWriter(&zst)
	_, _ = enc.Write(img)
	_ = enc.Close()
	mux := http.NewServeMux()
	mux.HandleFunc("/debian-12.qcow2", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write(img) })
	mux.HandleFunc("/debian-12.qcow2.zst", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write(zst.Bytes()) })
	mux.HandleFunc("/truncated.qcow2", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "3145728")
		_, _ = w.Write(img[:1<<20])
		// the handler returns: the connection closes short
		if hj, ok := w.(http.Hijacker); ok {
			c, _, _ := hj.Hijack()
			c.Close()
		}
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	root := t.TempDir()
	s := &images.Store{Root: root, Policy: images.Policy{AllowPrivate: true}}
	ctx := context.Background()

	var reports int
	got, err := s.Pull(ctx, srv.URL+"/debian-12.qcow2", images.PullOptions{SHA256: sum(img), Progress: func(done, total int64) { reports++ }})
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != "debian-12" || got.Digest != "sha256:"+sum(img) || got.Size != int64(len(img)) || reports == 0 {
		t.Fatalf("pulled %+v (%d progress reports)", got, reports)
	}
	if b, err := os.ReadFile(got.Path); err != nil || !bytes.Equal(b, img) {
		t.Fatalf("the stored file differs: %v", err)
	}
	if st, _ := os.Stat(got.Path); st.Mode().Perm()&0o222 != 0 {
		t.Errorf("the stored image is writable: %v", st.Mode())
	}
	// Only the worker's user reads the store (issue #22, item 7).
	for _, p := range []string{root, filepath.Join(root, "blobs", "sha256"), filepath.Join(root, "refs"), got.Path, filepath.Join(root, "refs", "debian-12.json")} {
		if st, err := os.Stat(p); err != nil || st.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s: %v %v: others may read it", p, st.Mode(), err)
		}
	}

	// The .zst of the same image: decompressed, checked against the
	// download's sha256, stored once (same content).
	z, err := s.Pull(ctx, srv.URL+"/debian-12.qcow2.zst", images.PullOptions{Name: "debian-12-zst", SHA256: sum(zst.Bytes())})
	if err != nil {
		t.Fatal(err)
	}
	if z.Digest != got.Digest || z.Path != got.Path || z.SourceDigest != "sha256:"+sum(zst.Bytes()) {
		t.Fatalf("zst pull %+v, want the same content as %+v", z, got)
	}
	if b, p := stored(t, root); b != 1 || p != 0 {
		t.Fatalf("%d blobs and %d partial files after two pulls of one image", b, p)
	}

	// Bad cases: a clear error, nothing stored.
	for _, c := range []struct {
		src, sha, want string
	}{
		{srv.URL + "/missing.qcow2", "", "HTTP 404 Not Found"},
		{srv.URL + "/truncated.qcow2", "", "closed the connection early"},
		{srv.URL + "/debian-12.qcow2", strings.Repeat("0", 64), "not the " + strings.Repeat("0", 64)},
		{"ftp://example.com/x.img", "", "want http(s)"},
		{srv.URL + "/debian-12.qcow2", "xyz", "64 hex digits"},
	} {
		_, err := s.Pull(ctx, c.src, images.PullOptions{Name: "bad", SHA256: c.sha})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("pull %s (sha %q): %v, want an error with %q", c.src, c.sha, err, c.want)
		}
		if _, err := s.Get("bad"); err == nil {
			t.Errorf("pull %s: a bad pull was named", c.src)
		}
	}
	if b, p := stored(t, root); b != 1 || p != 0 {
		t.Fatalf("%d blobs and %d partial files after the bad pulls", b, p)
	}

	list, err := s.List()
	if err != nil || len(list) != 2 || list[0].Name != "debian-12" || list[1].Name != "debian-12-zst" {
		t.Fatalf("list: %+v %v", list, err)
	}
	// Removing one name keeps the file the other still has; the last
	// removes it; an image in use is not removed.
	if err := s.Remove("debian-12", func(string) bool { return true }); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("removing an image in use: %v", err)
	}
	if err := s.Remove("debian-12", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(got.Path); err != nil {
		t.Fatalf("the file went with the first of two names: %v", err)
	}
	if err := s.Remove("debian-12-zst", nil); err != nil {
		t.Fatal(err)
	}
	if b, _ := stored(t, root); b != 0 {
		t.Fatalf("%d blobs after every name was removed", b)
	}
}

func TestPullOCI(t *testing.T) {
	var blobGets atomic.Int32
	reg := registry.New()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			blobGets.Add(1)
		}
		reg.ServeHTTP(w, r)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	data := disk(2 << 20)
	push := func(repo string, mt types.MediaType) v1.Hash {
		t.Helper()
		img, err := mutate.Append(empty.Image, mutate.Addendum{Layer: static.NewLayer(data, mt)})
		if err != nil {
			t.Fatal(err)
		}
		ref, err := name.ParseReference(host + "/" + repo)
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Write(ref, img); err != nil {
			t.Fatal(err)
		}
		d, _ := img.Digest()
		return d
	}
	push("vms/debian:12", "application/vnd.cloudnebula.qcow2.layer.v1")
	mdigest := push("vms/plain:1", "application/octet-stream")
	push("vms/wrong:1", "application/vnd.oci.image.layer.v1.tar+gzip")

	s := &images.Store{Root: t.TempDir(), Policy: images.Policy{AllowPrivate: true, AllowHTTPRegistry: true}}
	ctx := context.Background()
	got, err := s.Pull(ctx, "oci://"+host+"/vms/debian:12", images.PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != "debian-12" || got.Digest != "sha256:"+sum(data) || got.MediaType != "application/vnd.cloudnebula.qcow2.layer.v1" {
		t.Fatalf("pulled %+v", got)
	}
	before := blobGets.Load()
	// The same layer by another reference (by manifest digest): known by
	// its digest, not fetched again.
	again, err := s.Pull(ctx, "oci://"+host+"/vms/plain@"+mdigest.String(), images.PullOptions{Name: "plain"})
	if err != nil {
		t.Fatal(err)
	}
	if again.Path != got.Path || blobGets.Load() != before {
		t.Fatalf("the same layer was fetched again (%d blob GETs) or stored elsewhere: %+v", blobGets.Load()-before, again)
	}
	if _, err := s.Pull(ctx, "oci://"+host+"/vms/wrong:1", images.PullOptions{}); err == nil || !strings.Contains(err.Error(), "no disk image layer") {
		t.Fatalf("an image without a disk layer: %v", err)
	}
	if _, err := s.Pull(ctx, "oci://"+host+"/vms/missing:1", images.PullOptions{}); err == nil {
		t.Fatal("a missing reference pulled")
	}
	if b, p := stored(t, s.Root); b != 1 || p != 0 {
		t.Fatalf("%d blobs and %d partial files", b, p)
	}
}

func TestNameFrom(t *testing.T) {
	for src, want := range map[string]string{
		"https://cloud.debian.org/images/debian-12-generic-amd64.qcow2": "debian-12-generic-amd64",
		"https://example.com/x/Ubuntu_24.04.img.zst?sig=1":              "ubuntu_24-04",
		"oci://ghcr.io/cloudnebulaproject/vms/openindiana:2025.04":      "openindiana-2025-04",
		"oci://localhost:5000/debian:latest":                            "debian",
		"oci://localhost:5000/debian@sha256:" + strings.Repeat("a", 64): "debian",
	} {
		if got := api.ImageNameFrom(src); got != want {
			t.Errorf("NameFrom(%q) = %q, want %q", src, got, want)
		}
	}
}

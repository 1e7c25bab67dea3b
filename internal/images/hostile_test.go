package images_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/klauspost/compress/zstd"

	"github.com/vmherd/vmherd/internal/imagechain"
	"github.com/vmherd/vmherd/internal/images"
)

// secret marks what a remote side sends that must never reach an error.
const secret = "SECRET-REMOTE-TEXT"

// rawServer answers every connection with reply (after reading the
// request line when readFirst), then waits for the client to go.
func rawServer(t *testing.T, reply string, readFirst bool) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if readFirst {
					_, _ = bufio.NewReader(c).ReadString('\n')
				}
				_, _ = c.Write([]byte(reply))
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, _ = c.Read(make([]byte, 1))
			}()
		}
	}()
	return l.Addr().String()
}

// Pulls are refused before they reach a loopback, private, link-local or
// metadata address — directly, by name or after a redirect, checked as
// each connection is dialled — are capped in size (a zstd bomb too) and
// time, take only self-contained images, and never repeat what the remote
// side said (issue #22, item 6). Nothing is stored by any of them.
func TestHostilePulls(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	img := func(args ...string) []byte {
		t.Helper()
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v: %s", args, err, out)
		}
		b, err := os.ReadFile(args[len(args)-1])
		if err != nil {
			b, err = os.ReadFile(args[len(args)-2]) // the file before a size
		}
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var innerHits atomic.Int32
	inner := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		innerHits.Add(1)
		_, _ = w.Write(disk(1 << 20))
	}))
	defer inner.Close()
	innerPort := inner.Listener.Addr().(*net.TCPAddr).Port

	var bomb bytes.Buffer
	enc, _ := zstd.NewWriter(&bomb, zstd.WithEncoderLevel(zstd.SpeedBestCompression))
	zeros := make([]byte, 1<<20)
	for i := 0; i < 256; i++ {
		_, _ = enc.Write(zeros)
	}
	_ = enc.Close()
	files := map[string][]byte{
		"/backing.qcow2":  img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/passwd", filepath.Join(dir, "backing.qcow2"), "1M"),
		"/datafile.qcow2": img("create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw"), filepath.Join(dir, "datafile.qcow2"), "1M"),
		"/banner.qcow2":   img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/x\n\x1b[31m"+secret, filepath.Join(dir, "banner.qcow2"), "1M"),
		"/huge.qcow2":     img("create", "-q", "-f", "qcow2", filepath.Join(dir, "huge.qcow2"), "100T"),
		"/flat.vmdk":      []byte("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8 FLAT \"/etc/shadow\" 0\n"),
		"/bomb.raw.zst":   bomb.Bytes(),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/redirect", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, r.URL.Query().Get("to"), http.StatusFound)
	})
	mux.HandleFunc("/big.raw", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(int64(1)<<40))
		_, _ = w.Write(disk(1 << 10))
	})
	mux.HandleFunc("/stall.raw", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(2<<20))
		_, _ = w.Write(disk(1 << 10))
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})
	mux.HandleFunc("/missing.raw", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, secret, http.StatusNotFound)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		b, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write(b)
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	srvAddr := netip.MustParseAddrPort(srv.Listener.Addr().String())
	port := fmt.Sprint(srvAddr.Port())

	// A registry that answers every error with a message of its own.
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	regSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/manifests/") {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprintf(w, `{"errors":[{"code":"MANIFEST_UNKNOWN","message":%q}]}`, secret)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	defer regSrv.Close()
	regHost := strings.TrimPrefix(regSrv.URL, "http://")

	banner := rawServer(t, `INFO {"server_id":"`+secret+`","nonce":"`+secret+`","xkey":"`+secret+`"}`+"\r\n", false)
	status := rawServer(t, "HTTP/1.1 500 "+secret+"\r\nContent-Length: 0\r\n\r\n", true)

	strict := images.Policy{}
	onlySrv := images.AllowOnly(images.Policy{MaxSize: 64 << 20, Timeout: 10 * time.Second}, srvAddr)
	private := images.Policy{AllowPrivate: true, MaxSize: 64 << 20, Timeout: 10 * time.Second}
	cases := []struct {
		name   string
		p      images.Policy
		source string
		kind   error
		want   string
	}{
		{"loopback", strict, srv.URL + "/disk.raw", images.ErrDestination, "127.0.0.1 is a loopback address"},
		{"localhost by name", strict, "http://localhost:" + port + "/disk.raw", images.ErrDestination, "is a loopback address"},
		{"IPv6 loopback", strict, "http://[::1]:" + port + "/disk.raw", images.ErrDestination, "::1 is a loopback address"},
		{"IPv4-mapped loopback", strict, "http://[::ffff:127.0.0.1]:" + port + "/disk.raw", images.ErrDestination, "127.0.0.1 is a loopback address"},
		{"metadata", strict, "http://169.254.169.254/latest/meta-data/", images.ErrDestination, "169.254.169.254 is a cloud metadata address"},
		{"metadata, Alibaba", strict, "http://100.100.100.200/latest/meta-data/", images.ErrDestination, "is a cloud metadata address"},
		{"metadata, IPv6", strict, "http://[fd00:ec2::254]/latest/meta-data/", images.ErrDestination, "is a cloud metadata address"},
		{"link-local", strict, "http://169.254.1.1/x.raw", images.ErrDestination, "is a link-local address"},
		{"private", strict, "http://10.1.2.3/x.raw", images.ErrDestination, "10.1.2.3 is a private address"},
		{"shared", strict, "http://100.64.0.1/x.raw", images.ErrDestination, "shared (carrier-grade NAT)"},
		{"unspecified", strict, "http://0.0.0.0:" + port + "/disk.raw", images.ErrDestination, "unspecified address"},
		{"redirect to metadata", onlySrv, srv.URL + "/redirect?to=http://169.254.169.254/latest/meta-data/", images.ErrDestination, "169.254.169.254 is a cloud metadata address"},
		{"redirect to loopback", onlySrv, srv.URL + "/redirect?to=" + inner.URL + "/metrics", images.ErrDestination, "127.0.0.1 is a loopback address"},
		{"redirect to localhost", onlySrv, srv.URL + "/redirect?to=http://localhost:" + fmt.Sprint(innerPort) + "/metrics", images.ErrDestination, "is a loopback address"},
		{"redirect to file:", onlySrv, srv.URL + "/redirect?to=file:///etc/shadow", images.ErrRemote, "a scheme other than http(s)"},
		{"oci over plain HTTP", private, "oci://" + regHost + "/vms/x:1", images.ErrDestination, "plain HTTP"},
		{"registry error message", images.Policy{AllowPrivate: true, AllowHTTPRegistry: true}, "oci://" + regHost + "/vms/x:1", images.ErrRemote, "HTTP 404 Not Found"},
		{"NATS banner", private, "http://" + banner + "/", images.ErrRemote, "not a usable HTTP"},
		{"status text", private, "http://" + status + "/x.raw", images.ErrRemote, "HTTP 500 Internal Server Error"},
		{"error body", private, srv.URL + "/missing.raw", images.ErrRemote, "HTTP 404 Not Found"},
		{"zstd bomb", private, srv.URL + "/bomb.raw.zst", images.ErrTooLarge, "larger than 67108864 bytes"},
		{"announced length too big", private, srv.URL + "/big.raw", images.ErrTooLarge, "larger than 67108864 bytes"},
		{"stalled download", images.Policy{AllowPrivate: true, Timeout: 2 * time.Second}, srv.URL + "/stall.raw", images.ErrRemote, "timed out"},
		{"qcow2 with a backing file", private, srv.URL + "/backing.qcow2", imagechain.ErrRefused, "the downloaded image names a backing file: an image must stand alone"},
		{"qcow2 with a data file", private, srv.URL + "/datafile.qcow2", imagechain.ErrRefused, "external data file"},
		{"vmdk with a FLAT extent", private, srv.URL + "/flat.vmdk", imagechain.ErrRefused, "the downloaded image names a vmdk extent: an image must stand alone"},
		{"qcow2 with a backing file name as a message", private, srv.URL + "/banner.qcow2", imagechain.ErrRefused, "the downloaded image names a backing file"},
		{"huge virtual size", private, srv.URL + "/huge.qcow2", imagechain.ErrRefused, "the downloaded image has a virtual size of 109951162777600 bytes"},
	}
	root := t.TempDir()
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			s := &images.Store{Root: root, Policy: c.p}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			start := time.Now()
			_, err := s.Pull(ctx, c.source, images.PullOptions{Name: "hostile"})
			t.Logf("%v", err)
			if !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("pull %s: %v\nwant %v with %q", c.source, err, c.kind, c.want)
			}
			if err != nil && strings.Contains(err.Error(), secret) {
				t.Errorf("pull %s: the error repeats the remote side's text: %v", c.source, err)
			}
			if d := time.Since(start); d > 15*time.Second {
				t.Errorf("pull %s took %v", c.source, d)
			}
		})
	}
	if b, p := stored(t, root); b != 0 || p != 0 {
		t.Errorf("%d blobs and %d partial files after hostile pulls", b, p)
	}
	if _, err := (&images.Store{Root: root}).Get("hostile"); err == nil {
		t.Error("a hostile pull was named")
	}
	if n := innerHits.Load(); n != 0 {
		t.Errorf("the loopback server a redirect pointed at was reached %d times", n)
	}
	t.Logf("%d hostile pull targets tried", len(cases))
}

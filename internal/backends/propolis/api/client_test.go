package api

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestBytesJSON(t *testing.T) {
	b, err := json.Marshal(SerialHistory{Data: Bytes{0, 'a', 255}, LastByteOffset: 3})
	if err != nil || string(b) != `{"data":[0,97,255],"last_byte_offset":3}` {
		t.Fatalf("%s %v", b, err)
	}
	var h SerialHistory
	if err := json.Unmarshal(b, &h); err != nil || string(h.Data) != "\x00a\xff" {
		t.Fatalf("%q %v", h.Data, err)
	}
	if err := json.Unmarshal([]byte(`{"data":[256]}`), &h); err == nil {
		t.Fatal("256 accepted as a byte")
	}
}

// Every request carries the version header; error bodies, JSON or not,
// become APIErrors that say who answered what.
func TestErrorsAndHeader(t *testing.T) {
	var bad atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(VersionHeader) != Version {
			bad.Add(1)
		}
		switch r.URL.Path {
		case "/instance":
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = w.Write([]byte(`{"message":"VM initialization failed: no bootrom","request_id":"r-1"}`))
		case "/instance/state":
			w.WriteHeader(http.StatusBadGateway)
			_, _ = w.Write([]byte("upstream went away\n"))
		case "/instance/state-monitor":
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusGone)
			_, _ = w.Write([]byte(`{"error_code":"NoInstance","message":"No instance present","request_id":"r-2"}`))
		}
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	c := New(addr)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	_, err := c.Get(ctx)
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != 500 || ae.Body.RequestID != "r-1" {
		t.Fatalf("Get = %v", err)
	}
	want := "propolis-server at " + addr + " answered GET /instance with 500 Internal Server Error: VM initialization failed: no bootrom (request id r-1)"
	if err.Error() != want {
		t.Fatalf("message\n%s\nwant\n%s", err, want)
	}
	if err := c.PutState(ctx, RequestRun); StatusOf(err) != 502 || !strings.Contains(err.Error(), "upstream went away") {
		t.Fatalf("PutState = %v", err)
	}
	_, err = c.StateMonitor(ctx, 1)
	if !errors.Is(err, ErrNoInstance) || errors.Is(err, ErrAlreadyInitialized) || StatusOf(err) != 410 {
		t.Fatalf("StateMonitor = %v", err)
	}
	if n := bad.Load(); n != 0 {
		t.Fatalf("%d requests without api-version %s", n, Version)
	}
	// Bodies over the server's limit are not sent.
	huge := EnsureRequest{Properties: InstanceProperties{Description: strings.Repeat("x", MaxRequestBody)}}
	if err := c.Ensure(ctx, huge); !errors.Is(err, ErrBodyTooLarge) {
		t.Fatalf("Ensure with a huge body = %v", err)
	}
}

func TestSerialURL(t *testing.T) {
	n := uint64(10)
	if got := New("10.0.0.5:12400").SerialURL(HistoryQuery{MostRecent: &n}); got != "ws://10.0.0.5:12400/instance/serial?most_recent=10" {
		t.Fatal(got)
	}
}

// Serial data and error bodies come from the server: decoding them never
// panics, and decoded bytes survive a round trip.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"data":[104,105],"last_byte_offset":2}`))
	f.Add([]byte(`{"error_code":"NoInstance","message":"Server not initialized (no instance)","request_id":"x"}`))
	f.Add([]byte(`not json`))
	f.Fuzz(func(t *testing.T, b []byte) {
		_ = decodeError("a:1", "GET", "/instance", 500, b).Error()
		var h SerialHistory
		if json.Unmarshal(b, &h) != nil {
			return
		}
		out, err := json.Marshal(h)
		if err != nil {
			t.Fatal(err)
		}
		var h2 SerialHistory
		if err := json.Unmarshal(out, &h2); err != nil || string(h2.Data) != string(h.Data) {
			t.Fatalf("round trip %q -> %s -> %q (%v)", h.Data, out, h2.Data, err)
		}
	})
}

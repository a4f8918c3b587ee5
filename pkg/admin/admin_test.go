package admin

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/extractedprism/extractedprism/pkg/status"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestEndpoints(t *testing.T) {
	ready, alive := false, true
	s := New(Options{
		Alive: func() (bool, string) { return alive, "accept loop alive" },
		Ready: func() (bool, string) {
			return ready, map[bool]string{true: "2/3 upstreams healthy", false: "no healthy upstream (0/3)"}[ready]
		},
		Status: func() status.Document {
			return status.Document{Ready: ready, Upstreams: []status.Upstream{{Address: "10.0.0.1:6443", State: "up"}}}
		},
	})
	h := s.Handler()
	do := func(method, path string) (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(method, path, nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := do("GET", "/readyz"); code != 503 || !strings.Contains(body, "no healthy upstream (0/3)") {
		t.Fatalf("readyz not ready = %d %q", code, body)
	}
	ready = true
	if code, body := do("GET", "/readyz"); code != 200 || !strings.Contains(body, "2/3 upstreams healthy") {
		t.Fatalf("readyz ready = %d %q", code, body)
	}
	if code, body := do("HEAD", "/readyz"); code != 200 || body != "" {
		t.Fatalf("HEAD readyz = %d %q", code, body)
	}
	if code, _ := do("GET", "/healthz"); code != 200 {
		t.Fatalf("healthz = %d", code)
	}
	alive = false
	if code, _ := do("HEAD", "/healthz"); code != 503 {
		t.Fatalf("healthz with a dead accept loop = %d, want 503", code)
	}
	if code, _ := do("POST", "/readyz"); code != http.StatusMethodNotAllowed {
		t.Fatalf("POST readyz = %d, want 405", code)
	}
	code, body := do("GET", "/status")
	var doc status.Document
	if code != 200 || json.Unmarshal([]byte(body), &doc) != nil || len(doc.Upstreams) != 1 || !doc.Ready {
		t.Fatalf("status = %d %q", code, body)
	}
	if code, _ := do("GET", "/metrics"); code != 404 {
		t.Fatalf("metrics without handler = %d, want 404", code)
	}
}

func TestServeAndShutdown(t *testing.T) {
	s := New(Options{Alive: func() (bool, string) { return true, "ok" }})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	cl := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := cl.Get("http://" + ln.Addr().String() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(string(b), "ok") {
		t.Fatalf("healthz over TCP = %d %q", resp.StatusCode, b)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	if _, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		t.Fatal("admin port still open after shutdown")
	}
}

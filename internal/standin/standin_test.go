package standin_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/extractedprism/extractedprism/internal/standin"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// start runs a server for one test and closes it at the end.
func start(t *testing.T, opts standin.Options) *standin.Server {
	t.Helper()
	s, err := standin.Start(t.Context(), opts)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// client trusts s's certificate and speaks h2 unless h1 is set.
func client(t *testing.T, s *standin.Server, h1 bool) *http.Client {
	t.Helper()
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: s.CertPool(), MinVersion: tls.VersionTLS12},
		ForceAttemptHTTP2: !h1,
	}
	if h1 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

func get(t *testing.T, c *http.Client, url string) (int, string, *http.Response) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", url, err)
	}
	return resp.StatusCode, string(b), resp
}

func post(t *testing.T, c *http.Client, url string) int {
	t.Helper()
	resp, err := c.Post(url, "application/json", nil)
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode
}

func TestHealthAndReadiness(t *testing.T) {
	s := start(t, standin.Options{Name: "a"})
	c := client(t, s, false)
	for _, p := range []string{"/readyz", "/healthz", "/livez"} {
		code, body, resp := get(t, c, s.URL()+p)
		if code != http.StatusOK || body != "ok" {
			t.Errorf("GET %s = %d %q, want 200 \"ok\"", p, code, body)
		}
		if resp.ProtoMajor != 2 {
			t.Errorf("GET %s used %s, want HTTP/2", p, resp.Proto)
		}
	}

	if code := post(t, c, s.URL()+"/control/unready"); code != http.StatusOK {
		t.Fatalf("POST /control/unready = %d", code)
	}
	if s.Ready() {
		t.Errorf("Ready() = true after /control/unready")
	}
	for _, p := range []string{"/readyz", "/healthz", "/livez"} {
		if code, _, _ := get(t, c, s.URL()+p); code != http.StatusInternalServerError {
			t.Errorf("unready: GET %s = %d, want 500", p, code)
		}
	}
	// Other paths keep working while unready.
	if code, _, _ := get(t, c, s.URL()+"/"); code != http.StatusOK {
		t.Errorf("unready: GET / = %d, want 200", code)
	}
	if code, _, _ := get(t, c, s.URL()+"/bulk?bytes=10"); code != http.StatusOK {
		t.Errorf("unready: GET /bulk = %d, want 200", code)
	}

	if code := post(t, c, s.URL()+"/control/ready"); code != http.StatusOK {
		t.Fatalf("POST /control/ready = %d", code)
	}
	if code, _, _ := get(t, c, s.URL()+"/readyz"); code != http.StatusOK {
		t.Errorf("after /control/ready: GET /readyz = %d, want 200", code)
	}

	s.SetReady(false)
	if code, _, _ := get(t, c, s.URL()+"/readyz"); code != http.StatusInternalServerError {
		t.Errorf("after SetReady(false): GET /readyz = %d, want 500", code)
	}
	if code := post(t, c, s.URL()+"/readyz"); code != http.StatusMethodNotAllowed {
		t.Errorf("POST /readyz = %d, want 405", code)
	}
}

func TestLiveWhileUnready(t *testing.T) {
	s := start(t, standin.Options{Unready: true, LiveWhileUnready: true})
	c := client(t, s, true)
	want := map[string]int{"/readyz": 500, "/healthz": 200, "/livez": 200}
	for p, w := range want {
		if code, _, _ := get(t, c, s.URL()+p); code != w {
			t.Errorf("GET %s = %d, want %d", p, code, w)
		}
	}
}

func TestRootVersionAndCertificate(t *testing.T) {
	s := start(t, standin.Options{Name: "upstream-b"})
	c := client(t, s, true)
	code, body, resp := get(t, c, s.URL()+"/")
	if code != http.StatusOK {
		t.Fatalf("GET / = %d", code)
	}
	var info standin.RootInfo
	if err := json.Unmarshal([]byte(body), &info); err != nil {
		t.Fatalf("GET / body %q: %v", body, err)
	}
	if info.Name != "upstream-b" || info.Addr != s.Addr() || !info.Ready || info.Proto != "HTTP/1.1" {
		t.Errorf("GET / = %+v, want name upstream-b, addr %s, ready, HTTP/1.1", info, s.Addr())
	}
	if got := resp.Header.Get("X-Standin-Name"); got != "upstream-b" {
		t.Errorf("X-Standin-Name = %q", got)
	}
	if code, _, _ := get(t, c, s.URL()+"/nope"); code != http.StatusNotFound {
		t.Errorf("GET /nope = %d, want 404", code)
	}

	_, body, _ = get(t, c, s.URL()+"/version")
	var v standin.VersionInfo
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatalf("GET /version body %q: %v", body, err)
	}
	if v.Major != "1" || !strings.HasPrefix(v.GitVersion, "v1.") || v.Platform == "" {
		t.Errorf("GET /version = %+v", v)
	}

	// The certificate verifies for the names clients use for kube-apiserver.
	for _, name := range []string{"127.0.0.1", "::1", "localhost", "kubernetes", "kubernetes.default.svc"} {
		if err := s.Certificate().VerifyHostname(name); err != nil {
			t.Errorf("certificate does not cover %q: %v", name, err)
		}
	}
}

func TestCertificateCoversListenHost(t *testing.T) {
	s := start(t, standin.Options{Addr: "127.0.0.7:0"})
	if err := s.Certificate().VerifyHostname("127.0.0.7"); err != nil {
		t.Errorf("certificate does not cover the listen host: %v", err)
	}
	c := client(t, s, false)
	if code, _, _ := get(t, c, "https://"+s.Addr()+"/readyz"); code != http.StatusOK {
		t.Errorf("GET /readyz on 127.0.0.7 = %d", code)
	}
}

func TestBulk(t *testing.T) {
	s := start(t, standin.Options{})
	c := client(t, s, true)
	for _, n := range []int{0, 1, 300 << 10, 8 << 20} {
		resp, err := c.Get(s.URL() + "/bulk?bytes=" + itoa(n))
		if err != nil {
			t.Fatalf("GET /bulk?bytes=%d: %v", n, err)
		}
		got, err := io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if err != nil || got != int64(n) || resp.ContentLength != int64(n) {
			t.Errorf("GET /bulk?bytes=%d: read %d bytes (content-length %d), err %v", n, got, resp.ContentLength, err)
		}
	}
	for _, bad := range []string{"", "x", "-1", "99999999999999999"} {
		code, body, _ := get(t, c, s.URL()+"/bulk?bytes="+bad)
		if code != http.StatusBadRequest || !strings.Contains(body, "bytes=") {
			t.Errorf("GET /bulk?bytes=%s = %d %q, want 400 naming the parameter", bad, code, body)
		}
	}
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

func TestStreamUntilClientGoes(t *testing.T) {
	s := start(t, standin.Options{Name: "w"})
	for _, h1 := range []bool{true, false} {
		c := client(t, s, h1)
		ctx, cancel := context.WithCancel(t.Context())
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.URL()+"/stream?interval=5ms", nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("GET /stream: %v", err)
		}
		sc := bufio.NewScanner(resp.Body)
		for i := range int64(5) {
			if !sc.Scan() {
				t.Fatalf("stream ended after %d lines: %v", i, sc.Err())
			}
			var ev standin.StreamEvent
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil || ev.Seq != i || ev.Server != "w" {
				t.Fatalf("line %d = %q (%v), want seq %d from w", i, sc.Text(), err, i)
			}
		}
		cancel()
		_ = resp.Body.Close()
	}
	code, _, _ := get(t, client(t, s, true), s.URL()+"/stream?interval=0s")
	if code != http.StatusBadRequest {
		t.Errorf("GET /stream?interval=0s = %d, want 400", code)
	}
}

func TestCloseEndsStreamsAndConnections(t *testing.T) {
	s, err := standin.Start(t.Context(), standin.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, s, true)
	resp, err := c.Get(s.URL() + "/stream?interval=1h")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	br := bufio.NewReader(resp.Body)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatalf("first stream line: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := io.ReadAll(br); err == nil {
		t.Errorf("stream ended cleanly after Close, want a broken connection")
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := s.Wait(); err != nil {
		t.Errorf("Wait: %v", err)
	}
	if _, err := net.DialTimeout("tcp", s.Addr(), 5*time.Second); err == nil {
		t.Errorf("dial after Close succeeded, want refused")
	}
}

func TestShutdownEndsStreamsGracefully(t *testing.T) {
	s, err := standin.Start(t.Context(), standin.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, s, true)
	resp, err := c.Get(s.URL() + "/stream?interval=1h")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil || !strings.Contains(string(b), `"seq":0`) {
		t.Errorf("stream after Shutdown: %q, %v; want a clean end after the first line", b, err)
	}
}

func TestContextCancelStops(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	s, err := standin.Start(ctx, standin.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-s.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("server still serving 30 s after its context was cancelled")
	}
	if err := s.Wait(); err != nil {
		t.Errorf("Wait: %v", err)
	}
}

func TestStartErrors(t *testing.T) {
	s := start(t, standin.Options{})
	if _, err := standin.Start(t.Context(), standin.Options{Addr: s.Addr()}); err == nil || !strings.Contains(err.Error(), s.Addr()) {
		t.Errorf("Start on a busy address: err %v, want one naming %s", err, s.Addr())
	}
	if _, err := standin.Start(t.Context(), standin.Options{Addr: "nonsense"}); err == nil || !strings.Contains(err.Error(), "nonsense") {
		t.Errorf("Start on a bad address: err %v, want one naming it", err)
	}
}

func TestHangAcceptsAndNeverAnswers(t *testing.T) {
	s := start(t, standin.Options{Hang: true})
	conn, err := net.DialTimeout("tcp", s.Addr(), 5*time.Second)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer func() { _ = conn.Close() }()
	tc := tls.Client(conn, &tls.Config{RootCAs: s.CertPool(), ServerName: "localhost", MinVersion: tls.VersionTLS12})
	_ = tc.SetDeadline(time.Now().Add(300 * time.Millisecond))
	err = tc.Handshake()
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("TLS handshake with a hanging server: %v, want a timeout", err)
	}

	// Switching Hang off serves new connections again.
	s.SetHang(false)
	if code, _, _ := get(t, client(t, s, true), s.URL()+"/readyz"); code != http.StatusOK {
		t.Errorf("GET /readyz after SetHang(false) = %d", code)
	}
}

func TestResetAfterAccept(t *testing.T) {
	s := start(t, standin.Options{ResetAfterAccept: true})
	// The reset may arrive before connect returns or on the first read.
	conn, err := net.DialTimeout("tcp", s.Addr(), 5*time.Second)
	if err == nil {
		defer func() { _ = conn.Close() }()
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		_, err = conn.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("read from a resetting server: %v, want connection reset", err)
	}
	s.SetResetAfterAccept(false)
	if code, _, _ := get(t, client(t, s, false), s.URL()+"/healthz"); code != http.StatusOK {
		t.Errorf("GET /healthz after SetResetAfterAccept(false) = %d", code)
	}
}

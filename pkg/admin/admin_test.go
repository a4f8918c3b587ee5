package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
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

// serve runs s on a loopback port until the test ends and returns its
// address.
func serve(t *testing.T, s *Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	return ln.Addr().String()
}

// get does one GET on a fresh connection.
func get(addr, path string, header http.Header) (int, string, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest(http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return 0, "", err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// waitFor polls cond until it holds or the generous deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestMetricsRenderedAtMostOncePerInterval(t *testing.T) {
	var renders atomic.Int64
	metrics := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := renders.Add(1)
		format := "text"
		if strings.Contains(r.Header.Get("Accept"), "openmetrics") {
			format = "openmetrics"
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		time.Sleep(20 * time.Millisecond) // a render costs time; callers pile up meanwhile
		_, _ = fmt.Fprintf(w, "render %d %s\n", n, format)
	})
	// Room for every caller: this test is about renders, not the cap.
	s := New(Options{Metrics: metrics, MaxConns: 64})
	addr := serve(t, s)

	const callers = 50
	const hammer = 3 * time.Second
	start := time.Now()
	var wg sync.WaitGroup
	var answered, failed atomic.Int64
	var firstErr atomic.Value
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < hammer {
				code, body, err := get(addr, "/metrics", nil)
				if err != nil || code != http.StatusOK || !strings.HasPrefix(body, "render ") {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("%d %q %v", code, body, err))
					continue
				}
				answered.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if failed.Load() > 0 {
		t.Fatalf("%d of %d /metrics requests failed, first: %v", failed.Load(), failed.Load()+answered.Load(), firstErr.Load())
	}
	// At most one render per started second, plus the first.
	limit := int64(elapsed/time.Second) + 2
	t.Logf("%d callers: %d answers in %s from %d renders", callers, answered.Load(), elapsed.Round(time.Millisecond), renders.Load())
	if renders.Load() > limit {
		t.Fatalf("%d renders in %s for %d answers, want at most %d (one per second)", renders.Load(), elapsed, answered.Load(), limit)
	}
	if answered.Load() < 10*renders.Load() {
		t.Fatalf("only %d answers from %d renders: callers are not sharing renders", answered.Load(), renders.Load())
	}
	if got := s.Stats().MetricsRenders; got != uint64(renders.Load()) {
		t.Fatalf("Stats().MetricsRenders = %d, handler ran %d times", got, renders.Load())
	}

	// Each exposition format has its own render; a HEAD gets headers only.
	_, body, err := get(addr, "/metrics", http.Header{"Accept": {"application/openmetrics-text;version=1.0.0"}})
	if err != nil || !strings.HasSuffix(body, " openmetrics\n") {
		t.Fatalf("OpenMetrics scrape = %q %v", body, err)
	}
	resp, err := http.Head("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK || len(b) != 0 || resp.Header.Get("Content-Type") == "" {
		t.Fatalf("HEAD /metrics = %d %q %v", resp.StatusCode, b, resp.Header)
	}
}

func TestLargeHeaderRefused(t *testing.T) {
	addr := serve(t, New(Options{Alive: func() (bool, string) { return true, "ok" }}))
	// The server answers after the first 12 KiB and closes while the
	// client is still sending, so reading the body may end in a reset.
	code, _, err := get(addr, "/healthz", http.Header{"X-Filler": {strings.Repeat("a", 64<<10)}})
	if code != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("GET with a 64 KiB header = %d %v, want 431", code, err)
	}
	if code, _, err := get(addr, "/healthz", http.Header{"X-Filler": {strings.Repeat("a", 4<<10)}}); err != nil || code != http.StatusOK {
		t.Fatalf("GET with a 4 KiB header = %d %v, want 200", code, err)
	}
}

// TestConnectionCapKeepsProbesAnswering opens many more connections than
// the cap, some sending nothing and some sending half a header forever:
// the server never holds more than the cap, and /healthz and /readyz still
// answer at once.
func TestConnectionCapKeepsProbesAnswering(t *testing.T) {
	const maxConns = 8
	s := New(Options{
		MaxConns: maxConns,
		Alive:    func() (bool, string) { return true, "accept loop alive" },
		Ready:    func() (bool, string) { return true, "1/1 upstreams healthy" },
	})
	addr := serve(t, s)
	var hogs []net.Conn
	t.Cleanup(func() {
		for _, c := range hogs {
			_ = c.Close()
		}
	})
	for i := range 5 * maxConns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		hogs = append(hogs, c)
		if i%2 == 0 {
			_, _ = io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
		}
	}
	waitFor(t, "the hogs to be accepted and shed", func() bool {
		st := s.Stats()
		return st.Shed >= uint64(4*maxConns)
	})
	if st := s.Stats(); st.Conns > maxConns {
		t.Fatalf("server holds %d connections, cap is %d", st.Conns, maxConns)
	}
	for _, path := range []string{"/healthz", "/readyz", "/healthz"} {
		start := time.Now()
		code, body, err := get(addr, path, nil)
		if err != nil || code != http.StatusOK {
			t.Fatalf("%s with %d hogs = %d %q %v", path, len(hogs), code, body, err)
		}
		// kubelet's probes in the chart time out after 5 s.
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("%s took %s with the cap full", path, d)
		}
	}
	if st := s.Stats(); st.Conns > maxConns {
		t.Fatalf("server holds %d connections, cap is %d", st.Conns, maxConns)
	}
}

// closedByServer reports whether the server has closed c (a read ends in
// EOF or a reset rather than timing out).
func closedByServer(c net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	buf := make([]byte, 4096)
	for {
		_, err := c.Read(buf)
		if err == nil {
			continue // an answer (the 431, say); read on to see the close
		}
		var ne net.Error
		return !errors.As(err, &ne) || !ne.Timeout()
	}
}

// TestCapEvictsHeavyThenIdleThenSilent fills the cap with one connection
// of each kind and checks which one each newcomer replaces.
func TestCapEvictsHeavyThenIdleThenSilent(t *testing.T) {
	s := New(Options{MaxConns: 3, Alive: func() (bool, string) { return true, "ok" }})
	addr := serve(t, s)
	dial := func() net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	held := func(n int) {
		waitFor(t, fmt.Sprintf("%d connections held", n), func() bool { return s.Stats().Conns == n })
	}
	silent := dial()
	held(1)
	idle := dial()
	if _, err := io.WriteString(idle, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(idle).ReadString('\n'); err != nil || !strings.Contains(line, "200") {
		t.Fatalf("keep-alive request: %q %v", line, err)
	}
	held(2)
	heavy := dial()
	if _, err := io.WriteString(heavy, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "+strings.Repeat("a", 4<<10)); err != nil {
		t.Fatal(err)
	}
	held(3)
	waitFor(t, "the server to read the oversized header", func() bool { return s.Stats().Oversized == 1 })

	shed := s.Stats().Shed
	next := func(want net.Conn, what string) {
		t.Helper()
		dial()
		shed++
		waitFor(t, "a connection to make room", func() bool { return s.Stats().Shed >= shed })
		for _, c := range []struct {
			conn net.Conn
			name string
		}{{heavy, "heavy"}, {idle, "idle"}, {silent, "silent"}} {
			if c.conn == want && !closedByServer(c.conn) {
				t.Fatalf("the %s connection was not the one closed (%s)", c.name, what)
			}
		}
	}
	next(heavy, "first newcomer")
	next(idle, "second newcomer")
	next(silent, "third newcomer, once the silent one has waited 250 ms")
	if st := s.Stats(); st.Conns != 3 {
		t.Fatalf("held %d connections, want the 3 newcomers", st.Conns)
	}
}

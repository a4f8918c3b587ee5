package metrics

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestScrapeOverHTTP serves the registry on a loopback port, as the admin
// server does, and scrapes it like Prometheus and curl would.
func TestScrapeOverHTTP(t *testing.T) {
	m, reg := newTest(t)
	u := m.Upstream("127.0.0.1:6443", "static")
	u.SetHealthy(true)
	u.ConnOpened()
	m.Accepted()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: Handler(reg), ReadHeaderTimeout: 10 * time.Second}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; err != http.ErrServerClosed {
			t.Errorf("Serve: %v", err)
		}
	})
	url := "http://" + ln.Addr().String() + "/metrics"

	const want = `
# HELP extractedprism_accepted_connections_total Client connections accepted by the proxy listener.
# TYPE extractedprism_accepted_connections_total counter
extractedprism_accepted_connections_total 1
# HELP extractedprism_upstream_active_connections Client connections currently proxied to the upstream.
# TYPE extractedprism_upstream_active_connections gauge
extractedprism_upstream_active_connections{source="static",upstream="127.0.0.1:6443"} 1
# HELP extractedprism_upstream_healthy Whether the upstream is considered healthy (1) or not (0).
# TYPE extractedprism_upstream_healthy gauge
extractedprism_upstream_healthy{source="static",upstream="127.0.0.1:6443"} 1
`
	if err := testutil.ScrapeAndCompare(url, strings.NewReader(want),
		"extractedprism_accepted_connections_total",
		"extractedprism_upstream_active_connections",
		"extractedprism_upstream_healthy",
	); err != nil {
		t.Error(err)
	}

	// What curl shows: plain text with build info and runtime metrics.
	c := &http.Client{Timeout: 30 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Errorf("status %d, content type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	for _, line := range []string{
		`extractedprism_build_info{commit="abc1234",goversion="go1.26.8",version="v1.2.3"} 1`,
		"go_goroutines ",
	} {
		if !strings.Contains(string(body), line) {
			t.Errorf("/metrics lacks %q", line)
		}
	}
}

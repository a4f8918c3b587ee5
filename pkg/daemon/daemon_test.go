package daemon

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/extractedprism/extractedprism/internal/standin"
	"github.com/extractedprism/extractedprism/pkg/config"
	"github.com/extractedprism/extractedprism/pkg/status"
)

func TestMain(m *testing.M) {
	if addrs := os.Getenv(strangerEnv); addrs != "" {
		os.Exit(runStranger(addrs))
	}
	goleak.VerifyTestMain(m)
}

func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	return ln.Addr().(*net.TCPAddr).Port
}

func startStandin(t *testing.T, name string) *standin.Server {
	t.Helper()
	s, err := standin.Start(context.Background(), standin.Options{Addr: "127.0.0.1:0", Name: name, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(); _ = s.Wait() })
	return s
}

type running struct {
	cfg    config.Config
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan error
}

func (r *running) admin(path string) (int, string) {
	resp, err := http.Get("http://" + r.cfg.AdminAddr() + path) //nolint:noctx // test
	if err != nil {
		return 0, err.Error()
	}
	defer func() { _ = resp.Body.Close() }()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (r *running) status(t *testing.T) status.Document {
	t.Helper()
	code, body := r.admin("/status")
	var d status.Document
	if code != 200 || json.Unmarshal([]byte(body), &d) != nil {
		t.Fatalf("/status = %d %s", code, body)
	}
	return d
}

func start(t *testing.T, cfg config.Config, path string, reload chan struct{}) *running {
	t.Helper()
	r := &running{cfg: cfg, reg: prometheus.NewRegistry(), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() {
		r.done <- Run(ctx, Options{Config: cfg, ConfigPath: path, Reload: reload, Registry: r.reg,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return")
		}
	})
	waitFor(t, "admin server", 20*time.Second, func() bool { code, _ := r.admin("/healthz"); return code == 200 })
	return r
}

func baseConfig(t *testing.T, endpoints ...string) config.Config {
	cfg := config.Defaults()
	cfg.Listen.Port = freePort(t)
	cfg.Admin.Port = freePort(t)
	cfg.Endpoints = endpoints
	cfg.Probe.Interval = 200 * time.Millisecond
	cfg.Probe.Timeout = 200 * time.Millisecond
	cfg.Proxy.DrainTimeout = time.Second
	cfg.Discovery.StateFile = ""
	return cfg
}

func httpsGet(addr, path string) (string, error) {
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true} //nolint:gosec // test
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr, Timeout: 15 * time.Second}
	resp, err := cl.Get("https://" + addr + path)
	if err != nil {
		return "", err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return string(b), fmt.Errorf("status %d", resp.StatusCode)
	}
	return string(b), err
}

func TestTrafficMetricsAndStatus(t *testing.T) {
	a, b := startStandin(t, "a"), startStandin(t, "b")
	dead := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	r := start(t, baseConfig(t, a.Addr(), b.Addr(), dead), "", nil)
	waitFor(t, "ready with 2/3 healthy", 20*time.Second, func() bool {
		code, body := r.admin("/readyz")
		return code == 200 && strings.Contains(body, "2/3 upstreams healthy")
	})
	seen := map[string]int{}
	for range 20 {
		out, err := httpsGet(r.cfg.ListenAddr(), "/")
		if err != nil {
			t.Fatalf("GET through the proxy: %v", err)
		}
		var ans struct{ Name string }
		_ = json.Unmarshal([]byte(out), &ans)
		seen[ans.Name]++
	}
	if seen["a"] == 0 || seen["b"] == 0 || len(seen) != 2 {
		t.Fatalf("answers by upstream = %v, want both a and b", seen)
	}
	doc := r.status(t)
	if !doc.Ready || len(doc.Upstreams) != 3 {
		t.Fatalf("status = %+v", doc)
	}
	var total uint64
	for _, u := range doc.Upstreams {
		switch u.Address {
		case dead:
			if u.State != "down" || u.LastError == "" {
				t.Errorf("dead upstream status = %+v", u)
			}
		default:
			if u.State != "up" || u.Source != "static" || u.LastProbe.IsZero() {
				t.Errorf("live upstream status = %+v", u)
			}
			total += u.TotalConnections
		}
	}
	if total != 20 {
		t.Errorf("total connections in /status = %d, want 20", total)
	}
	waitFor(t, "connections closed", 10*time.Second, func() bool { return r.status(t).ActiveConnections == 0 })

	// Metrics follow the traffic.
	if got := testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_accepted_connections_total", nil)); got != 20 {
		t.Errorf("accepted_connections_total = %v, want 20", got)
	}
	var perUpstream float64
	for _, s := range []*standin.Server{a, b} {
		perUpstream += testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_upstream_connections_total", map[string]string{"upstream": s.Addr()}))
		if h := testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_upstream_healthy", map[string]string{"upstream": s.Addr()})); h != 1 {
			t.Errorf("upstream_healthy{%s} = %v, want 1", s.Addr(), h)
		}
		if sent := testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_upstream_sent_bytes_total", map[string]string{"upstream": s.Addr()})); sent == 0 {
			t.Errorf("upstream_sent_bytes_total{%s} = 0", s.Addr())
		}
	}
	if perUpstream != 20 {
		t.Errorf("sum of upstream_connections_total = %v, want 20", perUpstream)
	}
	if h := testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_upstream_healthy", map[string]string{"upstream": dead})); h != 0 {
		t.Errorf("upstream_healthy{dead} = %v, want 0", h)
	}
	if ok := testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_config_last_reload_successful", nil)); ok != 1 {
		t.Errorf("config_last_reload_successful = %v, want 1 after a good start", ok)
	}
	problems, err := testutil.GatherAndLint(r.reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

// mustCounter returns the single metric of family name whose labels
// include want, as a collector testutil.ToFloat64 can read.
func mustCounter(t *testing.T, g prometheus.Gatherer, name string, want map[string]string) prometheus.Collector {
	t.Helper()
	fams, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if labels[k] != v {
					continue next
				}
			}
			var v float64
			switch {
			case m.GetCounter() != nil:
				v = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				v = m.GetGauge().GetValue()
			}
			g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x"})
			g.Set(v)
			return g
		}
	}
	t.Fatalf("metric %s%v not found", name, want)
	return nil
}

func TestFailoverCountsAndNoClientError(t *testing.T) {
	a := startStandin(t, "a")
	dead := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := baseConfig(t, a.Addr(), dead)
	cfg.Probe.Interval = time.Hour // only the first round: dead stays "unknown"... until a dial fails
	cfg.Probe.Timeout = time.Second
	r := start(t, cfg, "", nil)
	waitFor(t, "ready", 20*time.Second, func() bool { code, _ := r.admin("/readyz"); return code == 200 })
	for range 10 {
		if _, err := httpsGet(r.cfg.ListenAddr(), "/"); err != nil {
			t.Fatalf("client saw an error: %v", err)
		}
	}
	if got := testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_no_upstream_total", nil)); got != 0 {
		t.Errorf("no_upstream_total = %v, want 0", got)
	}
}

func TestReloadAppliesAndBadFileKeepsRunningConfig(t *testing.T) {
	a, b := startStandin(t, "a"), startStandin(t, "b")
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	cfg := baseConfig(t, a.Addr())
	write := func(body string) {
		t.Helper()
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	head := fmt.Sprintf("listen: {port: %d}\nadmin: {port: %d}\nprobe: {interval: 200ms, timeout: 200ms}\ndiscovery: {state_file: \"\"}\n",
		cfg.Listen.Port, cfg.Admin.Port)
	write(head + fmt.Sprintf("endpoints: [%q]\n", a.Addr()))
	loaded, err := config.Load(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := start(t, loaded, path, nil)
	waitFor(t, "ready", 20*time.Second, func() bool { code, _ := r.admin("/readyz"); return code == 200 })

	write(head + fmt.Sprintf("endpoints: [%q, %q]\n", a.Addr(), b.Addr()))
	waitFor(t, "second endpoint applied", 20*time.Second, func() bool {
		d := r.status(t)
		return len(d.Upstreams) == 2 && d.Config.LastReloadOK && !d.Config.LastReload.IsZero()
	})

	write(head + "endpoints: [\"10.0.0.1\"]\nproxy: {dial_timout: 1s}\n")
	waitFor(t, "bad file reported", 20*time.Second, func() bool { return !r.status(t).Config.LastReloadOK })
	d := r.status(t)
	if len(d.Upstreams) != 2 || !strings.Contains(d.Config.LastReloadError, "dial_timeout") ||
		!strings.Contains(d.Config.LastReloadError, "10.0.0.1") {
		t.Fatalf("after a bad file: upstreams %d, error %q; want the running 2 upstreams and an error naming both problems",
			len(d.Upstreams), d.Config.LastReloadError)
	}
	if got := testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_config_last_reload_successful", nil)); got != 0 {
		t.Errorf("config_last_reload_successful = %v after a bad file, want 0", got)
	}
	if _, err := httpsGet(r.cfg.ListenAddr(), "/"); err != nil {
		t.Fatalf("proxy broke after a bad file: %v", err)
	}

	write(head + fmt.Sprintf("endpoints: [%q]\n", b.Addr()))
	waitFor(t, "good file applied", 20*time.Second, func() bool {
		d := r.status(t)
		return d.Config.LastReloadOK && len(d.Upstreams) == 1 && d.Upstreams[0].Address == b.Addr()
	})

}

func TestShutdownDrainsAndServesWithoutSuccessor(t *testing.T) {
	a := startStandin(t, "a")
	cfg := baseConfig(t, a.Addr())
	cfg.Proxy.DrainTimeout = 2 * time.Second
	r := start(t, cfg, "", nil)
	waitFor(t, "ready", 20*time.Second, func() bool { code, _ := r.admin("/readyz"); return code == 200 })

	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // test
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get("https://" + cfg.ListenAddr() + "/stream?interval=50ms")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	lines := make(chan int, 1)
	var mu sync.Mutex
	var last time.Time
	go func() {
		buf := make([]byte, 4096)
		n := 0
		for {
			k, err := resp.Body.Read(buf)
			if k > 0 {
				mu.Lock()
				last = time.Now()
				mu.Unlock()
				n++
			}
			if err != nil {
				lines <- n
				return
			}
		}
	}()
	stopAt := time.Now()
	r.cancel()
	waitFor(t, "readyz 503", 10*time.Second, func() bool { code, _ := r.admin("/readyz"); return code == 503 || code == 0 })
	// Nobody else serves the port: a new request is still answered.
	if _, err := httpsGet(cfg.ListenAddr(), "/"); err != nil {
		t.Fatalf("new request during the drain: %v; with no successor it must be served", err)
	}
	select {
	case <-lines:
	case <-time.After(30 * time.Second):
		t.Fatal("stream not cut after the drain timeout")
	}
	mu.Lock()
	survived := last.Sub(stopAt)
	mu.Unlock()
	if survived < 1500*time.Millisecond {
		t.Fatalf("stream stopped flowing %s after shutdown began, want about the 2s drain timeout", survived)
	}
	t.Logf("stream kept flowing %s after shutdown began (drain_timeout 2s)", survived.Round(10*time.Millisecond))
}

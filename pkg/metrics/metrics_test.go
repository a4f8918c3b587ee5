package metrics

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/extractedprism/extractedprism/pkg/failure"
)

var testBuild = BuildInfo{Version: "v1.2.3", Commit: "abc1234", GoVersion: "go1.26.8"}

func newTest(t testing.TB) (*Metrics, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	m, err := New(reg, testBuild)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return m, reg
}

// exercise touches every metric so that every family has samples.
func exercise(m *Metrics) {
	t0 := time.Unix(1700000000, 0)
	m.Accepted()
	m.Failover()
	m.Replayed()
	m.NoUpstream()
	m.ClosedOnDown(2)
	m.DrainCut(3)
	m.Rebalanced()
	m.DialDuration(3 * time.Millisecond)
	m.Refused("max_connections")
	m.SetMaxConnections(10240)
	m.ConfigReloaded(true, t0)
	m.DiscoverySynced(3, t0)
	m.DiscoveryWatchRestarted()
	u := m.Upstream("10.0.0.1:6443", "static")
	u.SetHealthy(true)
	u.ConnOpened()
	u.ConnClosed(100, 2000)
	u.DialFailed(failure.Refused)
	u.ProbeDone(true, 4*time.Millisecond, t0)
	u.ProbeDone(false, 2*time.Second, t0.Add(time.Second))
}

func TestLintClean(t *testing.T) {
	m, reg := newTest(t)
	exercise(m)
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatalf("GatherAndLint: %v", err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

func TestRegisteredNames(t *testing.T) {
	m, reg := newTest(t)
	exercise(m)
	got := registeredNames(t, reg)
	want := []string{
		"extractedprism_accepted_connections_total",
		"extractedprism_build_info",
		"extractedprism_closed_on_down_total",
		"extractedprism_config_last_reload_successful",
		"extractedprism_config_last_reload_timestamp_seconds",
		"extractedprism_connections_refused_total",
		"extractedprism_dial_duration_seconds",
		"extractedprism_discovery_endpoints",
		"extractedprism_discovery_endpoints_dropped_total",
		"extractedprism_discovery_last_sync_timestamp_seconds",
		"extractedprism_discovery_watch_restarts_total",
		"extractedprism_drain_cut_total",
		"extractedprism_failovers_total",
		"extractedprism_max_connections",
		"extractedprism_no_upstream_total",
		"extractedprism_rebalanced_total",
		"extractedprism_replays_total",
		"extractedprism_upstream_active_connections",
		"extractedprism_upstream_connections_total",
		"extractedprism_upstream_dial_failures_total",
		"extractedprism_upstream_healthy",
		"extractedprism_upstream_last_probe_success_timestamp_seconds",
		"extractedprism_upstream_probe_duration_seconds",
		"extractedprism_upstream_probe_failures_total",
		"extractedprism_upstream_readiness_shared",
		"extractedprism_upstream_readiness_unknown",
		"extractedprism_upstream_received_bytes_total",
		"extractedprism_upstream_sent_bytes_total",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("registered extractedprism metrics:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Runtime and process collectors are registered too.
	all, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var goSeen, procSeen bool
	for _, mf := range all {
		goSeen = goSeen || mf.GetName() == "go_goroutines"
		procSeen = procSeen || mf.GetName() == "process_start_time_seconds"
	}
	if !goSeen {
		t.Error("go_goroutines not registered")
	}
	if !procSeen {
		t.Log("process_start_time_seconds not exported (no procfs?)")
	}
}

// registeredNames lists the extractedprism_ metric families reg exports.
func registeredNames(t testing.TB, reg prometheus.Gatherer) []string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	var names []string
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), Namespace+"_") {
			names = append(names, mf.GetName())
		}
	}
	return names
}

func TestProxyWideCounters(t *testing.T) {
	m, _ := newTest(t)
	for range 5 {
		m.Accepted()
	}
	m.Failover()
	m.Failover()
	m.Replayed()
	m.NoUpstream()
	m.ClosedOnDown(4)
	m.ClosedOnDown(0)
	m.ClosedOnDown(-1)
	m.DrainCut(7)
	m.Rebalanced()
	m.DiscoveryWatchRestarted()
	m.Refused("max_connections")
	m.Refused("max_connections")
	m.SetMaxConnections(10240)
	for _, c := range []struct {
		name string
		c    prometheus.Collector
		want float64
	}{
		{"accepted", m.accepted, 5},
		{"failovers", m.failovers, 2},
		{"replays", m.replays, 1},
		{"no upstream", m.noUpstream, 1},
		{"closed on down", m.closedOnDown, 4},
		{"drain cut", m.drainCut, 7},
		{"rebalanced", m.rebalanced, 1},
		{"watch restarts", m.discoveryRestarts, 1},
		{"refused", m.refused.WithLabelValues("max_connections"), 2},
		{"max connections", m.maxConnections, 10240},
	} {
		if got := testutil.ToFloat64(c.c); got != c.want {
			t.Errorf("%s = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestConfigAndDiscovery(t *testing.T) {
	m, reg := newTest(t)
	at := time.Unix(1700000000, 500_000_000)
	m.ConfigReloaded(true, at)
	m.DiscoverySynced(3, at)
	m.ConfigReloaded(false, at.Add(time.Minute))
	m.DiscoverySynced(2, at.Add(2*time.Minute))
	const want = `
# HELP extractedprism_config_last_reload_successful Whether the last configuration load or reload succeeded (1) or failed (0).
# TYPE extractedprism_config_last_reload_successful gauge
extractedprism_config_last_reload_successful 0
# HELP extractedprism_config_last_reload_timestamp_seconds Unix time of the last configuration load or reload attempt.
# TYPE extractedprism_config_last_reload_timestamp_seconds gauge
extractedprism_config_last_reload_timestamp_seconds 1.7000000605e+09
# HELP extractedprism_discovery_endpoints API server endpoints found by the last EndpointSlice sync.
# TYPE extractedprism_discovery_endpoints gauge
extractedprism_discovery_endpoints 2
# HELP extractedprism_discovery_last_sync_timestamp_seconds Unix time of the last EndpointSlice sync.
# TYPE extractedprism_discovery_last_sync_timestamp_seconds gauge
extractedprism_discovery_last_sync_timestamp_seconds 1.7000001205e+09
# HELP extractedprism_build_info Build identity of the running binary; the value is always 1.
# TYPE extractedprism_build_info gauge
extractedprism_build_info{commit="abc1234",goversion="go1.26.8",version="v1.2.3"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"extractedprism_config_last_reload_successful",
		"extractedprism_config_last_reload_timestamp_seconds",
		"extractedprism_discovery_endpoints",
		"extractedprism_discovery_last_sync_timestamp_seconds",
		"extractedprism_build_info",
	); err != nil {
		t.Error(err)
	}
}

func TestUpstreamSeries(t *testing.T) {
	m, reg := newTest(t)
	at := time.Unix(1700000000, 0)
	a := m.Upstream("10.0.0.1:6443", "static")
	b := m.Upstream("[fd00::2]:6443", "discovered")
	if again := m.Upstream("10.0.0.1:6443", "static"); again != a {
		t.Fatal("Upstream returned a new holder for a known address")
	}
	a.SetHealthy(true)
	b.SetHealthy(false)
	for range 3 {
		a.ConnOpened()
	}
	a.ConnClosed(1000, 50000)
	a.ConnClosed(24, 0)
	b.DialFailed(failure.Refused)
	b.DialFailed(failure.Refused)
	b.DialFailed(failure.Timeout)
	b.DialFailed(failure.Unready)
	a.ProbeDone(true, 7812500*time.Nanosecond, at) // exact in binary: 2^-7 s
	a.ProbeDone(true, 62500*time.Microsecond, at.Add(2*time.Second))
	b.ProbeDone(false, 2*time.Second, at.Add(3*time.Second))

	const want = `
# HELP extractedprism_upstream_active_connections Client connections currently proxied to the upstream.
# TYPE extractedprism_upstream_active_connections gauge
extractedprism_upstream_active_connections{source="discovered",upstream="[fd00::2]:6443"} 0
extractedprism_upstream_active_connections{source="static",upstream="10.0.0.1:6443"} 1
# HELP extractedprism_upstream_connections_total Client connections proxied to the upstream.
# TYPE extractedprism_upstream_connections_total counter
extractedprism_upstream_connections_total{source="discovered",upstream="[fd00::2]:6443"} 0
extractedprism_upstream_connections_total{source="static",upstream="10.0.0.1:6443"} 3
# HELP extractedprism_upstream_dial_failures_total Failed connects to the upstream, by reason (refused, timeout, other).
# TYPE extractedprism_upstream_dial_failures_total counter
extractedprism_upstream_dial_failures_total{reason="other",source="discovered",upstream="[fd00::2]:6443"} 1
extractedprism_upstream_dial_failures_total{reason="other",source="static",upstream="10.0.0.1:6443"} 0
extractedprism_upstream_dial_failures_total{reason="refused",source="discovered",upstream="[fd00::2]:6443"} 2
extractedprism_upstream_dial_failures_total{reason="refused",source="static",upstream="10.0.0.1:6443"} 0
extractedprism_upstream_dial_failures_total{reason="timeout",source="discovered",upstream="[fd00::2]:6443"} 1
extractedprism_upstream_dial_failures_total{reason="timeout",source="static",upstream="10.0.0.1:6443"} 0
# HELP extractedprism_upstream_healthy Whether the upstream is considered healthy (1) or not (0).
# TYPE extractedprism_upstream_healthy gauge
extractedprism_upstream_healthy{source="discovered",upstream="[fd00::2]:6443"} 0
extractedprism_upstream_healthy{source="static",upstream="10.0.0.1:6443"} 1
# HELP extractedprism_upstream_last_probe_success_timestamp_seconds Unix time of the last successful health probe of the upstream (0 if none yet).
# TYPE extractedprism_upstream_last_probe_success_timestamp_seconds gauge
extractedprism_upstream_last_probe_success_timestamp_seconds{source="discovered",upstream="[fd00::2]:6443"} 0
extractedprism_upstream_last_probe_success_timestamp_seconds{source="static",upstream="10.0.0.1:6443"} 1.700000002e+09
# HELP extractedprism_upstream_probe_failures_total Failed health probes of the upstream.
# TYPE extractedprism_upstream_probe_failures_total counter
extractedprism_upstream_probe_failures_total{source="discovered",upstream="[fd00::2]:6443"} 1
extractedprism_upstream_probe_failures_total{source="static",upstream="10.0.0.1:6443"} 0
# HELP extractedprism_upstream_received_bytes_total Bytes received from the upstream by closed client connections.
# TYPE extractedprism_upstream_received_bytes_total counter
extractedprism_upstream_received_bytes_total{source="discovered",upstream="[fd00::2]:6443"} 0
extractedprism_upstream_received_bytes_total{source="static",upstream="10.0.0.1:6443"} 50000
# HELP extractedprism_upstream_sent_bytes_total Bytes sent to the upstream by closed client connections.
# TYPE extractedprism_upstream_sent_bytes_total counter
extractedprism_upstream_sent_bytes_total{source="discovered",upstream="[fd00::2]:6443"} 0
extractedprism_upstream_sent_bytes_total{source="static",upstream="10.0.0.1:6443"} 1024
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"extractedprism_upstream_active_connections",
		"extractedprism_upstream_connections_total",
		"extractedprism_upstream_dial_failures_total",
		"extractedprism_upstream_healthy",
		"extractedprism_upstream_last_probe_success_timestamp_seconds",
		"extractedprism_upstream_probe_failures_total",
		"extractedprism_upstream_received_bytes_total",
		"extractedprism_upstream_sent_bytes_total",
	); err != nil {
		t.Error(err)
	}

	const wantHist = `
# HELP extractedprism_upstream_probe_duration_seconds Duration of health probes of the upstream, successful or not.
# TYPE extractedprism_upstream_probe_duration_seconds histogram
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="0.0005"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="0.001"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="0.0025"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="0.005"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="0.01"} 1
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="0.025"} 1
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="0.05"} 1
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="0.1"} 2
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="0.25"} 2
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="0.5"} 2
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="1"} 2
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="2"} 2
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="5"} 2
extractedprism_upstream_probe_duration_seconds_bucket{source="static",upstream="10.0.0.1:6443",le="+Inf"} 2
extractedprism_upstream_probe_duration_seconds_sum{source="static",upstream="10.0.0.1:6443"} 0.0703125
extractedprism_upstream_probe_duration_seconds_count{source="static",upstream="10.0.0.1:6443"} 2
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="0.0005"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="0.001"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="0.0025"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="0.005"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="0.01"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="0.025"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="0.05"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="0.1"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="0.25"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="0.5"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="1"} 0
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="2"} 1
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="5"} 1
extractedprism_upstream_probe_duration_seconds_bucket{source="discovered",upstream="[fd00::2]:6443",le="+Inf"} 1
extractedprism_upstream_probe_duration_seconds_sum{source="discovered",upstream="[fd00::2]:6443"} 2
extractedprism_upstream_probe_duration_seconds_count{source="discovered",upstream="[fd00::2]:6443"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(wantHist), "extractedprism_upstream_probe_duration_seconds"); err != nil {
		t.Error(err)
	}
}

func TestDialDurationHistogram(t *testing.T) {
	m, reg := newTest(t)
	m.DialDuration(200 * time.Microsecond)
	m.DialDuration(time.Second)
	m.DialDuration(10 * time.Second)
	if n := testutil.CollectAndCount(m.dialDuration); n != 1 {
		t.Fatalf("dial duration series = %d, want 1", n)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "extractedprism_dial_duration_seconds" {
			continue
		}
		h := mf.GetMetric()[0].GetHistogram()
		if h.GetSampleCount() != 3 || h.GetSampleSum() != 11.0002 {
			t.Errorf("count %d sum %v, want 3 and 11.0002", h.GetSampleCount(), h.GetSampleSum())
		}
		return
	}
	t.Fatal("extractedprism_dial_duration_seconds not gathered")
}

func TestForgetUpstreamRemovesSeries(t *testing.T) {
	m, reg := newTest(t)
	a := m.Upstream("10.0.0.1:6443", "static")
	m.Upstream("10.0.0.2:6443", "static").SetHealthy(true)
	a.ConnOpened()
	// 11 series per upstream plus 2 more dial failure reasons.
	if n := testutil.CollectAndCount(m.upstreams); n != 2*13 {
		t.Fatalf("series before forget = %d, want 26", n)
	}
	m.ForgetUpstream("10.0.0.1:6443")
	m.ForgetUpstream("10.9.9.9:6443") // unknown: no-op
	if n := testutil.CollectAndCount(m.upstreams); n != 13 {
		t.Fatalf("series after forget = %d, want 13", n)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, mt := range mf.GetMetric() {
			for _, lp := range mt.GetLabel() {
				if lp.GetName() == "upstream" && lp.GetValue() == "10.0.0.1:6443" {
					t.Errorf("%s still has a series for the forgotten upstream", mf.GetName())
				}
			}
		}
	}
	// The held pointer keeps working without effect on the export.
	a.ConnClosed(1, 1)
	// Re-adding starts from zero.
	again := m.Upstream("10.0.0.1:6443", "discovered")
	if again == a {
		t.Fatal("Upstream after ForgetUpstream returned the forgotten holder")
	}
	if n := testutil.CollectAndCount(m.upstreams, "extractedprism_upstream_connections_total"); n != 2 {
		t.Errorf("connections_total series = %d, want 2", n)
	}
}

func TestSourceChangeKeepsHolder(t *testing.T) {
	m, reg := newTest(t)
	u := m.Upstream("10.0.0.1:6443", "state-file")
	u.ConnOpened()
	u.SetHealthy(true)
	if m.Upstream("10.0.0.1:6443", "discovered") != u {
		t.Fatal("source change replaced the holder")
	}
	const want = `
# HELP extractedprism_upstream_active_connections Client connections currently proxied to the upstream.
# TYPE extractedprism_upstream_active_connections gauge
extractedprism_upstream_active_connections{source="discovered",upstream="10.0.0.1:6443"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "extractedprism_upstream_active_connections"); err != nil {
		t.Error(err)
	}
}

func TestRegisterTwiceFails(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := New(reg, testBuild); err != nil {
		t.Fatal(err)
	}
	_, err := New(reg, testBuild)
	if err == nil {
		t.Fatal("second New on the same registry succeeded")
	}
	if !strings.Contains(err.Error(), "metrics: register") {
		t.Errorf("error %q does not say what failed", err)
	}
	if _, err := New(nil, testBuild); err == nil {
		t.Error("New(nil) succeeded")
	}
}

func TestNilIsNoOp(t *testing.T) {
	var m *Metrics
	exercise(m)
	m.ForgetUpstream("x")
	var u *UpstreamMetrics
	u.SetHealthy(true)
	u.ConnOpened()
	u.ConnClosed(1, 1)
	u.DialFailed(failure.Other)
	u.ProbeDone(true, time.Second, time.Now())
}

// TestConcurrentUse runs updates and scrapes together under -race and checks
// that the active gauge returns to zero and the totals add up.
func TestConcurrentUse(t *testing.T) {
	m, reg := newTest(t)
	const workers, perWorker = 8, 500
	var wg sync.WaitGroup
	stop := make(chan struct{})
	scraped := make(chan struct{})
	go func() {
		defer close(scraped)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := reg.Gather(); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			addrs := []string{"10.0.0.1:6443", "10.0.0.2:6443"}
			for i := range perWorker {
				u := m.Upstream(addrs[(w+i)%2], "static")
				u.ConnOpened()
				u.ProbeDone(i%2 == 0, time.Millisecond, time.Now())
				u.ConnClosed(10, 20)
				m.Accepted()
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-scraped
	var active, conns, sent float64
	for _, a := range []string{"10.0.0.1:6443", "10.0.0.2:6443"} {
		u := m.Upstream(a, "static")
		active += float64(u.active.Load())
		conns += float64(u.connections.Load())
		sent += float64(u.sent.Load())
	}
	if active != 0 || conns != workers*perWorker || sent != 10*workers*perWorker {
		t.Errorf("active %v conns %v sent %v", active, conns, sent)
	}
	if got := testutil.ToFloat64(m.accepted); got != workers*perWorker {
		t.Errorf("accepted = %v", got)
	}
}

func TestHotPathDoesNotAllocate(t *testing.T) {
	m, _ := newTest(t)
	u := m.Upstream("10.0.0.1:6443", "static")
	allocs := testing.AllocsPerRun(1000, func() {
		u.ConnOpened()
		u.ConnClosed(512, 4096)
		u.DialFailed(failure.Timeout)
		m.Accepted()
		m.DialDuration(time.Millisecond)
	})
	if allocs != 0 {
		t.Errorf("hot path allocates %v times per connection, want 0", allocs)
	}
}

func BenchmarkConnOpenedClosed(b *testing.B) {
	m, _ := newTest(b)
	u := m.Upstream("10.0.0.1:6443", "static")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			u.ConnOpened()
			u.ConnClosed(512, 4096)
		}
	})
}

func TestDiscoveryDroppedExportsEveryReason(t *testing.T) {
	m, reg := newTest(t)
	m.DiscoveryDropped("loopback", 2)
	m.DiscoveryDropped("over_cap", 2968)
	want := "# HELP extractedprism_discovery_endpoints_dropped_total Addresses from the EndpointSlice or the state file not used, by reason (each address counted once).\n" +
		"# TYPE extractedprism_discovery_endpoints_dropped_total counter\n"
	for _, r := range DropReasons {
		n := map[string]int{"loopback": 2, "over_cap": 2968}[r]
		want += fmt.Sprintf("extractedprism_discovery_endpoints_dropped_total{reason=%q} %d\n", r, n)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "extractedprism_discovery_endpoints_dropped_total"); err != nil {
		t.Fatal(err)
	}
}

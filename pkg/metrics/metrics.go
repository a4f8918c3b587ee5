// Package metrics holds the Prometheus metrics of extractedprism.
//
// New registers every collector on an injected prometheus.Registerer; the
// admin server exposes that registry at /metrics. Components receive a
// *Metrics (or a *UpstreamMetrics for one upstream) and call its methods.
//
// The per-connection path stays cheap: Upstream resolves the metrics of one
// upstream once, and the returned *UpstreamMetrics updates plain atomic
// counters (no label lookup, no allocation). The per-upstream series are
// produced at scrape time by a collector that walks the known upstreams.
//
// A nil *Metrics and a nil *UpstreamMetrics are valid and do nothing, so a
// component built without metrics needs no special case.
package metrics

import (
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/extractedprism/extractedprism/pkg/failure"
)

// Namespace prefixes every metric name.
const Namespace = "extractedprism"

// reasons lists the dial failure kinds that are values of the reason label
// of extractedprism_upstream_dial_failures_total, in label order; every
// upstream exports all of them (starting at 0) so rate() sees the first
// failure. Any other kind counts as failure.Other.
var reasons = [...]failure.Kind{failure.Refused, failure.Timeout, failure.Other}

// LatencyBuckets are the histogram buckets (seconds) of probe and dial
// durations: from loopback (sub-millisecond) to the default 2 s timeout and
// beyond.
var LatencyBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5}

// BuildInfo identifies the running binary; it becomes the labels of
// extractedprism_build_info.
type BuildInfo struct{ Version, Commit, GoVersion string }

// Metrics holds every collector of the daemon. Create it with New.
type Metrics struct {
	accepted     prometheus.Counter
	failovers    prometheus.Counter
	replays      prometheus.Counter
	noUpstream   prometheus.Counter
	closedOnDown prometheus.Counter
	drainCut     prometheus.Counter
	rebalanced   prometheus.Counter
	dialDuration prometheus.Histogram

	configOK   prometheus.Gauge
	configTime prometheus.Gauge

	discoveryEndpoints prometheus.Gauge
	discoverySync      prometheus.Gauge
	discoveryRestarts  prometheus.Counter
	discoveryDropped   *prometheus.CounterVec

	listenerStrangers *prometheus.GaugeVec

	refused        *prometheus.CounterVec
	maxConnections prometheus.Gauge

	upstreams *upstreamCollector
}

// New creates the metrics and registers them, together with the Go runtime
// and process collectors and extractedprism_build_info, on reg. It fails if
// any of them is already registered there.
func New(reg prometheus.Registerer, b BuildInfo) (*Metrics, error) {
	if reg == nil {
		return nil, errors.New("metrics: registerer is nil")
	}
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: name, Help: help})
	}
	gauge := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: name, Help: help})
	}
	m := &Metrics{
		accepted:     counter("accepted_connections_total", "Client connections accepted by the proxy listener."),
		failovers:    counter("failovers_total", "Client connections that needed a retry on another upstream because the first choice failed."),
		replays:      counter("replays_total", "Client connections whose buffered TLS handshake was replayed to another upstream."),
		noUpstream:   counter("no_upstream_total", "Client connections closed because no upstream was reachable."),
		closedOnDown: counter("closed_on_down_total", "Client connections closed because their upstream was marked down."),
		drainCut:     counter("drain_cut_total", "Client connections still open at the end of the drain timeout and cut."),
		rebalanced:   counter("rebalanced_total", "Client connections closed by rebalancing so that clients spread over upstreams again."),
		dialDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: Namespace,
			Name:      "dial_duration_seconds",
			Help:      "Duration of upstream connects made for client connections, successful or not.",
			Buckets:   LatencyBuckets,
		}),
		configOK:           gauge("config_last_reload_successful", "Whether the last configuration load or reload succeeded (1) or failed (0)."),
		configTime:         gauge("config_last_reload_timestamp_seconds", "Unix time of the last configuration load or reload attempt."),
		discoveryEndpoints: gauge("discovery_endpoints", "API server endpoints found by the last EndpointSlice sync."),
		discoverySync:      gauge("discovery_last_sync_timestamp_seconds", "Unix time of the last EndpointSlice sync."),
		discoveryRestarts:  counter("discovery_watch_restarts_total", "Restarts of the EndpointSlice watch after it ended or failed."),
		discoveryDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace,
			Name:      "discovery_endpoints_dropped_total",
			Help:      "Addresses from the EndpointSlice or the state file not used, by reason (each address counted once).",
		}, []string{"reason"}),
		listenerStrangers: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: Namespace,
			Name:      "listener_strangers",
			Help:      "Listening sockets on the port of a reuse-port listener that are not an extractedprism of the same UID; they get a share of the new connections.",
		}, []string{"listener"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace,
			Name:      "connections_refused_total",
			Help:      "Client connections accepted and reset at once without being proxied, by reason (max_connections: the cap on connections proxied at once was reached).",
		}, []string{"reason"}),
		maxConnections: gauge("max_connections", "The cap on client connections proxied at once, over all upstreams (proxy.max_connections, or its derived default)."),
		upstreams:      newUpstreamCollector(),
	}
	buildInfo := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace:   Namespace,
		Name:        "build_info",
		Help:        "Build identity of the running binary; the value is always 1.",
		ConstLabels: prometheus.Labels{"version": b.Version, "commit": b.Commit, "goversion": b.GoVersion},
	})
	buildInfo.Set(1)

	cs := []prometheus.Collector{
		m.accepted, m.failovers, m.replays, m.noUpstream, m.closedOnDown, m.drainCut, m.rebalanced,
		m.dialDuration, m.configOK, m.configTime, m.discoveryEndpoints, m.discoverySync,
		m.discoveryRestarts, m.discoveryDropped, m.listenerStrangers, m.refused, m.maxConnections, m.upstreams, buildInfo,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	}
	for _, r := range DropReasons {
		m.discoveryDropped.WithLabelValues(r)
	}
	for _, r := range RefuseReasons {
		m.refused.WithLabelValues(r)
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("metrics: register %T: %w", c, err)
		}
	}
	return m, nil
}

// Accepted counts one accepted client connection.
func (m *Metrics) Accepted() {
	if m != nil {
		m.accepted.Inc()
	}
}

// Failover counts one client connection that needed a retry on another
// upstream.
func (m *Metrics) Failover() {
	if m != nil {
		m.failovers.Inc()
	}
}

// Replayed counts one client handshake replayed to another upstream.
func (m *Metrics) Replayed() {
	if m != nil {
		m.replays.Inc()
	}
}

// NoUpstream counts one client connection closed because nothing was
// reachable.
func (m *Metrics) NoUpstream() {
	if m != nil {
		m.noUpstream.Inc()
	}
}

// ClosedOnDown counts n connections closed because their upstream went down.
func (m *Metrics) ClosedOnDown(n int) {
	if m != nil && n > 0 {
		m.closedOnDown.Add(float64(n))
	}
}

// DrainCut counts n connections cut at the end of the drain.
func (m *Metrics) DrainCut(n int) {
	if m != nil && n > 0 {
		m.drainCut.Add(float64(n))
	}
}

// Rebalanced counts one connection closed by rebalancing.
func (m *Metrics) Rebalanced() {
	if m != nil {
		m.rebalanced.Inc()
	}
}

// RefuseReasons are the values of the reason label of
// extractedprism_connections_refused_total; each is exported from the
// start (at 0) so that rate() sees the first refusal.
var RefuseReasons = []string{"max_connections"}

// Refused counts one client connection refused for reason.
func (m *Metrics) Refused(reason string) {
	if m != nil {
		m.refused.WithLabelValues(reason).Inc()
	}
}

// SetMaxConnections records the cap on connections proxied at once.
func (m *Metrics) SetMaxConnections(n int) {
	if m != nil {
		m.maxConnections.Set(float64(n))
	}
}

// DialDuration observes the duration of one upstream connect.
func (m *Metrics) DialDuration(d time.Duration) {
	if m != nil {
		m.dialDuration.Observe(d.Seconds())
	}
}

// Upstream returns the metrics of the upstream addr, creating them on first
// use. source ("static", "discovered", "state-file") becomes the source
// label; a later call with another source relabels the same series holder,
// so pointers callers keep stay valid. Keep the pointer: its methods need no
// lookup.
func (m *Metrics) Upstream(addr, source string) *UpstreamMetrics {
	if m == nil {
		return nil
	}
	return m.upstreams.get(addr, source)
}

// ForgetUpstream removes the series of the upstream addr. Pointers still
// held keep working but are no longer exported; a later Upstream(addr, ...)
// starts fresh series.
func (m *Metrics) ForgetUpstream(addr string) {
	if m != nil {
		m.upstreams.forget(addr)
	}
}

// ConfigReloaded records the result of a configuration load or reload.
func (m *Metrics) ConfigReloaded(ok bool, at time.Time) {
	if m == nil {
		return
	}
	m.configOK.Set(boolFloat(ok))
	m.configTime.Set(unixSeconds(at))
}

// DiscoverySynced records an EndpointSlice sync that found endpoints
// addresses.
func (m *Metrics) DiscoverySynced(endpoints int, at time.Time) {
	if m == nil {
		return
	}
	m.discoveryEndpoints.Set(float64(endpoints))
	m.discoverySync.Set(unixSeconds(at))
}

// DropReasons are the values of the reason label of
// extractedprism_discovery_endpoints_dropped_total, all exported from the
// start (they are discovery's DropReasons).
var DropReasons = []string{"loopback", "unspecified", "link_local", "multicast", "self", "hostname", "over_cap"}

// DiscoveryDropped counts n addresses of discovery dropped for reason.
func (m *Metrics) DiscoveryDropped(reason string, n int) {
	if m != nil && n > 0 {
		m.discoveryDropped.WithLabelValues(reason).Add(float64(n))
	}
}

// DiscoveryWatchRestarted counts one restart of the EndpointSlice watch.
func (m *Metrics) DiscoveryWatchRestarted() {
	if m != nil {
		m.discoveryRestarts.Inc()
	}
}

// ListenerStrangers records the number of strangers found on the port of
// a listener ("listen" or "admin").
func (m *Metrics) ListenerStrangers(listener string, n int) {
	if m != nil {
		m.listenerStrangers.WithLabelValues(listener).Set(float64(n))
	}
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// unixSeconds converts t to Unix seconds with sub-second precision.
func unixSeconds(t time.Time) float64 {
	return float64(t.UnixNano()) / 1e9
}

// Ensure the upstream collector satisfies the interface at compile time.
var _ prometheus.Collector = (*upstreamCollector)(nil)

// upstreamCollector exports the per-upstream series at scrape time.
type upstreamCollector struct {
	healthy       *prometheus.Desc
	unknown       *prometheus.Desc
	shared        *prometheus.Desc
	active        *prometheus.Desc
	connections   *prometheus.Desc
	dialFailures  *prometheus.Desc
	probeDuration *prometheus.Desc
	probeFailures *prometheus.Desc
	lastProbeOK   *prometheus.Desc
	sentBytes     *prometheus.Desc
	receivedBytes *prometheus.Desc

	mu     sync.Mutex
	byAddr map[string]*UpstreamMetrics
}

func newUpstreamCollector() *upstreamCollector {
	labels := []string{"upstream", "source"}
	desc := func(name, help string, extra ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(Namespace, "upstream", name), help, append(labels, extra...), nil)
	}
	return &upstreamCollector{
		healthy:       desc("healthy", "Whether the upstream is considered healthy (1) or not (0)."),
		unknown:       desc("readiness_unknown", "1 while the upstream answers probes but not about its readiness (401/403: give probe credentials), so it is routed to on liveness alone."),
		shared:        desc("readiness_shared", "1 while the upstream's readiness comes from the cluster's shared verdict rather than this node's own checks."),
		active:        desc("active_connections", "Client connections currently proxied to the upstream."),
		connections:   desc("connections_total", "Client connections proxied to the upstream."),
		dialFailures:  desc("dial_failures_total", "Failed connects to the upstream, by reason (refused, timeout, other).", "reason"),
		probeDuration: desc("probe_duration_seconds", "Duration of health probes of the upstream, successful or not."),
		probeFailures: desc("probe_failures_total", "Failed health probes of the upstream."),
		lastProbeOK:   desc("last_probe_success_timestamp_seconds", "Unix time of the last successful health probe of the upstream (0 if none yet)."),
		sentBytes:     desc("sent_bytes_total", "Bytes sent to the upstream by closed client connections."),
		receivedBytes: desc("received_bytes_total", "Bytes received from the upstream by closed client connections."),
		byAddr:        make(map[string]*UpstreamMetrics),
	}
}

func (c *upstreamCollector) get(addr, source string) *UpstreamMetrics {
	c.mu.Lock()
	defer c.mu.Unlock()
	u, ok := c.byAddr[addr]
	if !ok {
		u = &UpstreamMetrics{addr: addr, probes: newHistogram(LatencyBuckets)}
		c.byAddr[addr] = u
	}
	u.source = source
	return u
}

func (c *upstreamCollector) forget(addr string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.byAddr, addr)
}

// Describe implements prometheus.Collector.
func (c *upstreamCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.healthy, c.unknown, c.shared, c.active, c.connections, c.dialFailures, c.probeDuration,
		c.probeFailures, c.lastProbeOK, c.sentBytes, c.receivedBytes,
	} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *upstreamCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for addr, u := range c.byAddr {
		src := u.source
		ch <- prometheus.MustNewConstMetric(c.healthy, prometheus.GaugeValue, boolFloat(u.healthy.Load()), addr, src)
		ch <- prometheus.MustNewConstMetric(c.unknown, prometheus.GaugeValue, boolFloat(u.unknown.Load()), addr, src)
		ch <- prometheus.MustNewConstMetric(c.shared, prometheus.GaugeValue, boolFloat(u.shared.Load()), addr, src)
		ch <- prometheus.MustNewConstMetric(c.active, prometheus.GaugeValue, float64(u.active.Load()), addr, src)
		ch <- prometheus.MustNewConstMetric(c.connections, prometheus.CounterValue, float64(u.connections.Load()), addr, src)
		for i, r := range reasons {
			ch <- prometheus.MustNewConstMetric(c.dialFailures, prometheus.CounterValue, float64(u.dialFailures[i].Load()), addr, src, r.String())
		}
		count, sum, buckets := u.probes.snapshot()
		ch <- prometheus.MustNewConstHistogram(c.probeDuration, count, sum, buckets, addr, src)
		ch <- prometheus.MustNewConstMetric(c.probeFailures, prometheus.CounterValue, float64(u.probeFailures.Load()), addr, src)
		var last float64
		if ns := u.lastProbeOK.Load(); ns != 0 {
			last = float64(ns) / 1e9
		}
		ch <- prometheus.MustNewConstMetric(c.lastProbeOK, prometheus.GaugeValue, last, addr, src)
		ch <- prometheus.MustNewConstMetric(c.sentBytes, prometheus.CounterValue, float64(u.sent.Load()), addr, src)
		ch <- prometheus.MustNewConstMetric(c.receivedBytes, prometheus.CounterValue, float64(u.received.Load()), addr, src)
	}
}

// Handler serves the metrics of g in the Prometheus text format (or
// OpenMetrics when the scraper asks for it), for /metrics on the admin port.
// Gathering errors are served as HTTP 500 and not hidden.
func Handler(g prometheus.Gatherer) http.Handler {
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{EnableOpenMetrics: true})
}

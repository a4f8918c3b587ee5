package metrics

import (
	"math"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
)

// UpstreamMetrics holds the counters of one upstream. Get it from
// Metrics.Upstream and keep it: every method is a few atomic operations,
// safe for concurrent use, and does not allocate. A nil *UpstreamMetrics
// does nothing.
type UpstreamMetrics struct {
	addr string
	// source is guarded by the collector's mutex.
	source string

	healthy       atomic.Bool
	unknown       atomic.Bool // readiness unknown (401/403 without credentials)
	shared        atomic.Bool // readiness taken from the shared verdict
	active        atomic.Int64
	connections   atomic.Uint64
	dialFailures  [len(reasons)]atomic.Uint64
	probeFailures atomic.Uint64
	lastProbeOK   atomic.Int64 // Unix nanoseconds, 0 = never
	sent          atomic.Uint64
	received      atomic.Uint64
	probes        *histogram
}

// SetHealthy records whether the upstream is considered healthy.
func (u *UpstreamMetrics) SetHealthy(ok bool) {
	if u != nil {
		u.healthy.Store(ok)
	}
}

// SetReadiness records where the upstream's readiness came from: unknown
// (it answers probes but not about readiness, e.g. 401 without
// credentials), and whether from the cluster's shared verdict.
func (u *UpstreamMetrics) SetReadiness(unknown, shared bool) {
	if u != nil {
		u.unknown.Store(unknown)
		u.shared.Store(shared)
	}
}

// ConnOpened records a client connection now proxied to the upstream.
func (u *UpstreamMetrics) ConnOpened() {
	if u == nil {
		return
	}
	u.connections.Add(1)
	u.active.Add(1)
}

// ConnClosed records the end of a client connection opened with ConnOpened
// and the bytes it sent to and received from the upstream.
func (u *UpstreamMetrics) ConnClosed(sentBytes, receivedBytes int64) {
	if u == nil {
		return
	}
	u.active.Add(-1)
	if sentBytes > 0 {
		u.sent.Add(uint64(sentBytes))
	}
	if receivedBytes > 0 {
		u.received.Add(uint64(receivedBytes))
	}
}

// DialFailed counts a failed connect to the upstream, or a connection it
// failed before its first byte, by kind; kinds without a label of their
// own count as failure.Other.
func (u *UpstreamMetrics) DialFailed(kind failure.Kind) {
	if u == nil {
		return
	}
	i := len(reasons) - 1
	for j, r := range reasons {
		if r == kind {
			i = j
		}
	}
	u.dialFailures[i].Add(1)
}

// ProbeDone records a finished health probe: its result, its duration and
// when it finished.
func (u *UpstreamMetrics) ProbeDone(ok bool, d time.Duration, at time.Time) {
	if u == nil {
		return
	}
	u.probes.observe(d.Seconds())
	if ok {
		u.lastProbeOK.Store(at.UnixNano())
	} else {
		u.probeFailures.Add(1)
	}
}

// histogram is a small cumulative-at-snapshot histogram. Probes run once per
// interval per upstream, so a mutex is cheap enough.
type histogram struct {
	bounds []float64
	mu     sync.Mutex
	counts []uint64 // per bucket, not cumulative; last entry is +Inf
	count  uint64
	sum    float64
}

func newHistogram(bounds []float64) *histogram {
	return &histogram{bounds: bounds, counts: make([]uint64, len(bounds)+1)}
}

func (h *histogram) observe(v float64) {
	if math.IsNaN(v) {
		return
	}
	i := sort.SearchFloat64s(h.bounds, v) // first bound >= v: the "le" bucket
	h.mu.Lock()
	h.counts[i]++
	h.count++
	h.sum += v
	h.mu.Unlock()
}

// snapshot returns the count, the sum and the cumulative bucket counts keyed
// by upper bound, as prometheus.NewConstHistogram wants them.
func (h *histogram) snapshot() (count uint64, sum float64, buckets map[float64]uint64) {
	buckets = make(map[float64]uint64, len(h.bounds))
	h.mu.Lock()
	defer h.mu.Unlock()
	var cum uint64
	for i, b := range h.bounds {
		cum += h.counts[i]
		buckets[b] = cum
	}
	return h.count, h.sum, buckets
}

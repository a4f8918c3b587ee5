package proxy

import (
	"context"
	"math/rand/v2"
	"time"

	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// RebalanceOptions configure gradual rebalancing. After a rolling restart
// long-lived connections (watches) stay piled on the apiservers that stayed
// up; with rebalancing on, the oldest surplus connections of an overloaded
// upstream are closed one at a time so their clients reconnect through the
// balancer, which sends them to the least loaded upstream. The trade-off:
// each close costs a client one reconnect (and a watch one re-list or
// resume), so it is off by default and strictly rate limited.
type RebalanceOptions struct {
	Enabled bool
	// Tolerance is how far above the fair share (connections / healthy
	// upstreams) the busiest upstream may be before rebalancing (0.2 = 20 %).
	Tolerance float64
	// MinAge: younger connections are never closed.
	MinAge time.Duration
	// Period: at most one close per period, jittered by up to +50 %.
	Period time.Duration
	// MaxFractionPerMinute bounds closes per minute to this fraction of all
	// connections (at least one per minute).
	MaxFractionPerMinute float64
}

func (s *Server) rebalanceLoop(ctx context.Context) {
	var recent []time.Time
	for {
		o := s.opts.Load()
		period := o.Rebalance.Period
		if period <= 0 {
			period = time.Second
		}
		wait := period + time.Duration(rand.Int64N(int64(period)/2+1)) //nolint:gosec // jitter
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		o = s.opts.Load()
		if !o.Rebalance.Enabled {
			recent = recent[:0]
			continue
		}
		now := o.Now()
		keep := recent[:0]
		for _, at := range recent {
			if now.Sub(at) < time.Minute {
				keep = append(keep, at)
			}
		}
		recent = keep
		if s.rebalanceOnce(o, now, len(recent)) {
			recent = append(recent, now)
		}
	}
}

// rebalanceOnce closes at most one surplus connection and reports whether
// it did.
func (s *Server) rebalanceOnce(o *Options, now time.Time, closedLastMinute int) bool {
	type load struct {
		u     *upstream.Upstream
		n     int
		conns []*conn
	}
	var healthy []*upstream.Upstream
	for _, st := range s.set.Snapshot() {
		if st.State == upstream.Up {
			if u := s.set.Lookup(st.Address); u != nil {
				healthy = append(healthy, u)
			}
		}
	}
	if len(healthy) < 2 {
		return false
	}
	loads := make(map[*upstream.Upstream]*load, len(healthy))
	for _, u := range healthy {
		loads[u] = &load{u: u}
	}
	s.mu.Lock()
	total := len(s.byUp[nil]) // still connecting: they count towards the fair share
	for u, l := range loads {
		for c := range s.byUp[u] {
			if c.killReason() != "" {
				continue // already closing: its client is about to move
			}
			l.n++
			l.conns = append(l.conns, c)
		}
		total += l.n
	}
	s.mu.Unlock()
	budget := max(1, int(o.Rebalance.MaxFractionPerMinute*float64(total)))
	if total == 0 || closedLastMinute >= budget {
		return false
	}
	fair := float64(total) / float64(len(healthy))
	var busiest, idlest *load
	for _, l := range loads {
		if busiest == nil || l.n > busiest.n {
			busiest = l
		}
		if idlest == nil || l.n < idlest.n {
			idlest = l
		}
	}
	// Close only if the busiest is over tolerance and moving one connection
	// actually narrows the spread.
	if float64(busiest.n) <= (1+o.Rebalance.Tolerance)*fair || busiest.n-idlest.n < 2 {
		return false
	}
	var oldest *conn
	for _, c := range busiest.conns {
		if now.Sub(c.start) < o.Rebalance.MinAge {
			continue
		}
		if oldest == nil || c.start.Before(oldest.start) {
			oldest = c
		}
	}
	if oldest == nil {
		return false
	}
	if !oldest.claim(reasonRebalance) {
		return false // closed for another reason since the count above
	}
	o.Observer.Rebalanced()
	oldest.closeNow()
	o.Logger.Info("rebalanced a connection", "upstream", busiest.u.Addr(), "upstream_connections", busiest.n,
		"fair_share", fair, "age", now.Sub(oldest.start).Round(time.Second))
	return true
}

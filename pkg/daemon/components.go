package daemon

import (
	"context"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/extractedprism/extractedprism/pkg/failure"
	"github.com/extractedprism/extractedprism/pkg/metrics"
	"github.com/extractedprism/extractedprism/pkg/probe"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// runner runs one component's Run(ctx) in the daemon's errgroup and can
// stop it alone (for a restart on reload). A nil error from a stopped
// component does not stop the group.
type runner struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func startRunner(g *errgroup.Group, parent context.Context, run func(context.Context) error) *runner {
	ctx, cancel := context.WithCancel(parent)
	r := &runner{cancel: cancel, done: make(chan struct{})}
	g.Go(func() error {
		defer close(r.done)
		return run(ctx)
	})
	return r
}

// stop cancels the component and waits for its Run to return.
func (r *runner) stop() {
	r.cancel()
	<-r.done
}

// prober owns the current probe.Prober and restarts it with new options.
type prober struct {
	g      *errgroup.Group
	parent context.Context

	mu      sync.Mutex
	p       *probe.Prober
	r       *runner
	targets []string
}

func newProber(g *errgroup.Group, parent context.Context, o probe.Options) *prober {
	pr := &prober{g: g, parent: parent}
	pr.p = probe.New(o)
	pr.r = startRunner(g, parent, pr.p.Run)
	return pr
}

// probeNow asks the running prober for a probe of addr at once.
func (pr *prober) probeNow(addr string) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.p.ProbeNow(addr)
}

// reassess asks the running prober to apply the shared readiness
// verdicts at once.
func (pr *prober) reassess() {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.p.Reassess()
}

func (pr *prober) setTargets(addrs []string) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.targets = addrs
	pr.p.SetTargets(addrs)
}

// restart stops the running prober and starts one with o on the same
// targets; upstream state stays in the Set, so nothing flaps.
func (pr *prober) restart(o probe.Options) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.r.stop()
	pr.p = probe.New(o)
	pr.p.SetTargets(pr.targets)
	pr.r = startRunner(pr.g, pr.parent, pr.p.Run)
}

// observer adapts metrics.Metrics to proxy.Observer; per-upstream
// collectors are resolved once and kept in Upstream.Attachment.
type observer struct{ m *metrics.Metrics }

func (o observer) Accepted()                    { o.m.Accepted() }
func (o observer) Failover()                    { o.m.Failover() }
func (o observer) Replayed()                    { o.m.Replayed() }
func (o observer) NoUpstream()                  { o.m.NoUpstream() }
func (o observer) ClosedOnDown(n int)           { o.m.ClosedOnDown(n) }
func (o observer) DrainCut(n int)               { o.m.DrainCut(n) }
func (o observer) Rebalanced()                  { o.m.Rebalanced() }
func (o observer) DialDuration(d time.Duration) { o.m.DialDuration(d) }
func (o observer) Refused(reason string)        { o.m.Refused(reason) }

func (o observer) ConnOpened(u *upstream.Upstream) {
	if m := upstreamMetrics(u); m != nil {
		m.ConnOpened()
	}
}

func (o observer) ConnClosed(u *upstream.Upstream, sent, received int64) {
	if m := upstreamMetrics(u); m != nil {
		m.ConnClosed(sent, received)
	}
}

func (o observer) DialFailed(u *upstream.Upstream, kind failure.Kind) {
	if m := upstreamMetrics(u); m != nil {
		m.DialFailed(kind)
	}
}

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Chaos load: half the workers keep one connection alive (like a
// controller's watch and list client), half open a new TLS connection per
// request (like kubectl and short-lived jobs), each paced at chaosRate.
const (
	chaosKAWorkers    = 4
	chaosFreshWorkers = 4
	chaosRate         = 50 // requests per second per worker
	chaosReqTimeout   = 10 * time.Second
	slowThreshold     = time.Second
	// stopGrace is how long extractedprism may take to mark a stopped
	// upstream down with the bench's settings: fall (2) x interval (1 s)
	// + probe timeout (1 s).
	stopGrace = 3 * time.Second
	// The unready scenario's load: unreadyClients clients each opening a
	// new TLS connection per request, unreadyRate requests per second
	// each, so that traffic flows on the unready upstream until the
	// balancer avoids it.
	unreadyClients = 16
	unreadyRate    = 20
)

type chaosEvent struct {
	at       time.Time
	lat      time.Duration
	upstream string
	failed   bool
	fresh    bool
	err      string
}

type chaosLoad struct {
	mu     sync.Mutex
	events []chaosEvent
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// startChaosLoad starts the chaos load through addr: chaosKAWorkers
// keep-alive and chaosFreshWorkers new-connection clients.
func startChaosLoad(ctx context.Context, addr string) *chaosLoad {
	return startLoad(ctx, addr, chaosKAWorkers, chaosFreshWorkers, chaosRate)
}

// startLoad starts kaClients keep-alive clients and freshClients clients
// that open a new TLS connection per request, each doing rate GET / per
// second.
func startLoad(ctx context.Context, addr string, kaClients, freshClients, rate int) *chaosLoad {
	ctx, cancel := context.WithCancel(ctx)
	l := &chaosLoad{cancel: cancel, events: make([]chaosEvent, 0, 1<<15)}
	for w := range kaClients + freshClients {
		fresh := w >= kaClients
		l.wg.Go(func() {
			c := newHTTPClientKA(chaosReqTimeout, !fresh)
			defer c.CloseIdleConnections()
			t := time.NewTicker(time.Second / time.Duration(rate))
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				t0 := time.Now()
				// Requests are not cut short by the end of the load: a
				// request in flight at the end still counts.
				code, name, err := c.get(context.WithoutCancel(ctx), addr, "/")
				ev := chaosEvent{at: t0, lat: time.Since(t0), upstream: name, failed: err != nil || code != http.StatusOK, fresh: fresh}
				if err != nil {
					ev.err = err.Error()
				} else if code != http.StatusOK {
					ev.err = fmt.Sprintf("status %d", code)
				}
				l.mu.Lock()
				l.events = append(l.events, ev)
				l.mu.Unlock()
			}
		})
	}
	return l
}

// stop ends the load and waits for requests in flight.
func (l *chaosLoad) stop() []chaosEvent {
	l.cancel()
	l.wg.Wait()
	return l.events
}

// window counts the requests started in [from, to) and notes up to three
// distinct failure causes under key in r.Failures.
func window(r *chaosResult, key string, evs []chaosEvent, from, to time.Time) (total, failed, slow int) {
	for _, e := range evs {
		if e.at.Before(from) || !e.at.Before(to) {
			continue
		}
		total++
		if e.failed {
			failed++
			if r == nil {
				continue
			}
			kind := "keep-alive"
			if e.fresh {
				kind = "new-connection"
			}
			msg := fmt.Sprintf("%s client, +%.1f s after %s, after %.1f s: %s", kind, e.at.Sub(from).Seconds(), key, e.lat.Seconds(), e.err)
			if r.Failures == nil {
				r.Failures = map[string][]string{}
			}
			if len(r.Failures[key]) < 3 {
				r.Failures[key] = append(r.Failures[key], msg)
			}
		}
		if e.lat > slowThreshold {
			slow++
		}
	}
	return total, failed, slow
}

// chaosResult is one balancer's chaos figures.
type chaosResult struct {
	KillTotal, KillFailed, KillSlow int
	RollTotal, RollFailed, RollSlow int
	UnreadyFresh                    int
	UnreadyShare                    float64
	// UnreadyClients is the number of new-connection clients of the
	// unready scenario; 0 in results of the chaos load's 4.
	UnreadyClients                  int `json:",omitempty"`
	StopTotal, StopFailed, StopSlow int
	StopLateFailed, StopLateSlow    int // requests started stopGrace or later after SIGSTOP
	TermStreams                     int
	TermSurviveMedian               float64 // seconds
	TermSurviveMax                  float64
	TermExit                        float64           // seconds from SIGTERM to exit, -1 if not within the window
	TermRefusedAfter                float64           // ms from SIGTERM to the first refused connect, -1 if none
	TermAccepted, TermServed        int               // connects accepted after SIGTERM, and of those answered
	Silent                          *silentResult     `json:",omitempty"`
	AllUnready                      *allUnreadyResult `json:",omitempty"`
	AnonOff                         *anonOffResult    `json:",omitempty"`
	AnonOffToken                    *anonOffResult    `json:",omitempty"`
	Errors                          []string
	Failures                        map[string][]string // samples of failed requests per scenario
}

// scenario is one chaos scenario.
type scenario struct {
	name string
	// upstreams is how the stand-ins run (zero: their defaults).
	upstreams upstreamMode
	// balancer is how the balancer runs (zero: the harness's defaults).
	balancer balancerMode
	run      func(e *env, ctx context.Context, name string, p *proc, r *chaosResult) error
	// merge copies this scenario's figures from src to dst.
	merge func(dst, src *chaosResult)
	// failures is the key of its samples in chaosResult.Failures.
	failures string
}

// scenarios are the chaos scenarios, in the order they run.
var scenarios = []scenario{
	{name: "kill", failures: "kill",
		run: func(e *env, ctx context.Context, name string, _ *proc, r *chaosResult) error {
			return e.chaosKill(ctx, name, r)
		},
		merge: func(d, s *chaosResult) {
			d.KillTotal, d.KillFailed, d.KillSlow = s.KillTotal, s.KillFailed, s.KillSlow
		}},
	{name: "rolling", failures: "rolling",
		run: func(e *env, ctx context.Context, name string, _ *proc, r *chaosResult) error {
			return e.chaosRolling(ctx, name, r)
		},
		merge: func(d, s *chaosResult) {
			d.RollTotal, d.RollFailed, d.RollSlow = s.RollTotal, s.RollFailed, s.RollSlow
		}},
	{name: "unready",
		run: func(e *env, ctx context.Context, name string, _ *proc, r *chaosResult) error {
			return e.chaosUnready(ctx, name, r)
		},
		merge: func(d, s *chaosResult) {
			d.UnreadyFresh, d.UnreadyShare, d.UnreadyClients = s.UnreadyFresh, s.UnreadyShare, s.UnreadyClients
		}},
	{name: "sigstop", failures: "sigstop",
		run: func(e *env, ctx context.Context, name string, _ *proc, r *chaosResult) error {
			return e.chaosStop(ctx, name, r)
		},
		merge: func(d, s *chaosResult) {
			d.StopTotal, d.StopFailed, d.StopSlow = s.StopTotal, s.StopFailed, s.StopSlow
			d.StopLateFailed, d.StopLateSlow = s.StopLateFailed, s.StopLateSlow
		}},
	{name: "sigterm",
		run: func(e *env, ctx context.Context, name string, p *proc, r *chaosResult) error {
			return e.chaosTerm(ctx, name, p, r)
		},
		merge: func(d, s *chaosResult) {
			d.TermStreams, d.TermSurviveMedian, d.TermSurviveMax = s.TermStreams, s.TermSurviveMedian, s.TermSurviveMax
			d.TermExit, d.TermRefusedAfter = s.TermExit, s.TermRefusedAfter
			d.TermAccepted, d.TermServed = s.TermAccepted, s.TermServed
		}},
	{name: "silent", failures: "silent", upstreams: upstreamMode{handshake: silentHandshake},
		run: func(e *env, ctx context.Context, name string, _ *proc, r *chaosResult) error {
			return e.chaosSilent(ctx, name, r)
		},
		merge: func(d, s *chaosResult) { d.Silent = s.Silent }},
	{name: "allunready", failures: "allunready",
		run: func(e *env, ctx context.Context, name string, _ *proc, r *chaosResult) error {
			return e.chaosAllUnready(ctx, name, r)
		},
		merge: func(d, s *chaosResult) { d.AllUnready = s.AllUnready }},
	{name: "anonoff", failures: "anonoff", upstreams: upstreamMode{auth: true},
		run: func(e *env, ctx context.Context, name string, _ *proc, r *chaosResult) error {
			return e.chaosAnonOff(ctx, name, "anonoff", &r.AnonOff, r)
		},
		merge: func(d, s *chaosResult) { d.AnonOff = s.AnonOff }},
	{name: "anonoff-token", failures: "anonoff-token", upstreams: upstreamMode{auth: true}, balancer: balancerMode{probeToken: true},
		run: func(e *env, ctx context.Context, name string, _ *proc, r *chaosResult) error {
			return e.chaosAnonOff(ctx, name, "anonoff-token", &r.AnonOffToken, r)
		},
		merge: func(d, s *chaosResult) { d.AnonOffToken = s.AnonOffToken }},
}

// scenarioNames lists every scenario's name.
func scenarioNames() []string {
	n := make([]string, len(scenarios))
	for i, s := range scenarios {
		n[i] = s.name
	}
	return n
}

// pickScenarios parses --scenarios.
func pickScenarios(list string) ([]string, error) {
	var out []string
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		if !slices.Contains(scenarioNames(), n) {
			return nil, fmt.Errorf("--scenarios %q: unknown scenario %q (known: %s)", list, n, strings.Join(scenarioNames(), ", "))
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out, nil
}

// chaos runs the chosen chaos scenarios against one balancer.
func (e *env) chaos(ctx context.Context, log *slog.Logger, name string, chosen []string) chaosResult {
	var r chaosResult
	for _, s := range scenarios {
		if ctx.Err() != nil {
			break
		}
		if !slices.Contains(chosen, s.name) {
			continue
		}
		log.Info("chaos", "balancer", name, "scenario", s.name)
		if err := e.useUpstreams(ctx, s.upstreams); err != nil {
			r.Errors = append(r.Errors, fmt.Sprintf("%s: upstreams: %v", s.name, err))
			continue
		}
		if err := e.healUpstreams(ctx); err != nil {
			r.Errors = append(r.Errors, fmt.Sprintf("%s: heal upstreams: %v", s.name, err))
			continue
		}
		p, _, err := e.startBalancerMode(ctx, name, s.balancer)
		if err != nil {
			r.Errors = append(r.Errors, fmt.Sprintf("%s: %v", s.name, err))
			continue
		}
		// Let every balancer see all upstreams healthy (rise 2 x interval).
		sleepCtx(ctx, 2*healthEvery+500*time.Millisecond)
		if err := s.run(e, ctx, name, p, &r); err != nil {
			r.Errors = append(r.Errors, fmt.Sprintf("%s: %v", s.name, err))
			log.Warn("chaos scenario failed", "balancer", name, "scenario", s.name, "err", err)
		}
		p.stop(15 * time.Second)
	}
	return r
}

// useUpstreams (re)starts the stand-ins that do not run as a scenario
// needs.
func (e *env) useUpstreams(ctx context.Context, mode upstreamMode) error {
	for _, u := range e.upstreams {
		if u.upstreamMode == mode && u.p != nil && !u.p.exited() {
			continue
		}
		if u.p != nil {
			u.p.stop(5 * time.Second)
		}
		u.upstreamMode = mode
		if err := u.start(ctx); err != nil {
			return err
		}
	}
	return nil
}

// healUpstreams brings every upstream back: running, not stopped, ready.
func (e *env) healUpstreams(ctx context.Context) error {
	c := newHTTPClient(5 * time.Second)
	defer c.CloseIdleConnections()
	for _, u := range e.upstreams {
		if u.p == nil || u.p.exited() {
			if err := u.start(ctx); err != nil {
				return err
			}
			continue
		}
		_ = u.p.signal(syscall.SIGCONT)
		if code, err := post(ctx, c, u.addr, "/control/ready"); err != nil || code != http.StatusOK {
			return fmt.Errorf("upstream %s: POST /control/ready: %d %w", u.name, code, err)
		}
	}
	return nil
}

func post(ctx context.Context, c *httpClient, addr, path string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+addr+path, nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	_ = resp.Body.Close()
	return resp.StatusCode, nil
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// chaosKill: SIGKILL one upstream under load, restart it 2 s later, keep
// the load 5 s after it is back.
func (e *env) chaosKill(ctx context.Context, name string, r *chaosResult) error {
	l := startChaosLoad(ctx, e.targets(name)[0])
	sleepCtx(ctx, 2*time.Second)
	from := time.Now()
	u := e.upstreams[0]
	u.kill()
	sleepCtx(ctx, 2*time.Second)
	err := u.start(ctx)
	sleepCtx(ctx, 5*time.Second)
	to := time.Now()
	evs := l.stop()
	r.KillTotal, r.KillFailed, r.KillSlow = window(r, "kill", evs, from, to)
	return err
}

// chaosRolling: SIGTERM (graceful) each upstream in turn, restart it after
// 1 s, wait until the balancers could have seen it healthy again, go on.
func (e *env) chaosRolling(ctx context.Context, name string, r *chaosResult) error {
	l := startChaosLoad(ctx, e.targets(name)[0])
	sleepCtx(ctx, 2*time.Second)
	from := time.Now()
	var errs []error
	for _, u := range e.upstreams {
		if err := u.terminate(); err != nil {
			errs = append(errs, err)
		}
		sleepCtx(ctx, time.Second)
		if err := u.start(ctx); err != nil {
			errs = append(errs, err)
		}
		sleepCtx(ctx, 2*healthEvery+time.Second)
	}
	sleepCtx(ctx, 2*time.Second)
	to := time.Now()
	evs := l.stop()
	r.RollTotal, r.RollFailed, r.RollSlow = window(r, "rolling", evs, from, to)
	return errors.Join(errs...)
}

// chaosUnready: one upstream answers 500 on /readyz (its /healthz stays
// 200, as kube-apiserver's does while shutting down) and keeps serving,
// under a load of unreadyClients clients that each open a new connection
// per request, so traffic keeps flowing on the unready upstream until the
// balancer avoids it; after 5 s, count which upstream new connections
// reach for 5 s.
func (e *env) chaosUnready(ctx context.Context, name string, r *chaosResult) error {
	l := startLoad(ctx, e.targets(name)[0], 0, unreadyClients, unreadyRate)
	sleepCtx(ctx, time.Second)
	c := newHTTPClient(5 * time.Second)
	defer c.CloseIdleConnections()
	u := e.upstreams[0]
	if code, err := post(ctx, c, u.addr, "/control/unready"); err != nil || code != http.StatusOK {
		l.stop()
		return fmt.Errorf("upstream %s: POST /control/unready: %d %w", u.name, code, err)
	}
	sleepCtx(ctx, 5*time.Second)
	from := time.Now()
	sleepCtx(ctx, 5*time.Second)
	to := time.Now()
	evs := l.stop()
	var fresh, toU int
	for _, ev := range evs {
		if !ev.fresh || ev.failed || ev.at.Before(from) || !ev.at.Before(to) {
			continue
		}
		fresh++
		if ev.upstream == u.name {
			toU++
		}
	}
	r.UnreadyFresh, r.UnreadyClients = fresh, unreadyClients
	if fresh > 0 {
		r.UnreadyShare = float64(toU) / float64(fresh)
	}
	return nil
}

// chaosStop: SIGSTOP one upstream under load for 12 s, then SIGCONT.
func (e *env) chaosStop(ctx context.Context, name string, r *chaosResult) error {
	l := startChaosLoad(ctx, e.targets(name)[0])
	sleepCtx(ctx, 2*time.Second)
	u := e.upstreams[0]
	from := time.Now()
	err := u.p.signal(syscall.SIGSTOP)
	sleepCtx(ctx, 12*time.Second)
	to := time.Now()
	_ = u.p.signal(syscall.SIGCONT)
	evs := l.stop()
	r.StopTotal, r.StopFailed, r.StopSlow = window(r, "sigstop", evs, from, to)
	_, r.StopLateFailed, r.StopLateSlow = window(nil, "", evs, from.Add(stopGrace), to)
	return err
}

// chaosTerm: 10 watch-like streams through the balancer, then SIGTERM to
// the balancer: how long do the streams keep flowing, and are new
// connections refused (so clients fail over at once) or accepted?
func (e *env) chaosTerm(ctx context.Context, name string, p *proc, r *chaosResult) error {
	const streams = 10
	addr := e.targets(name)[0]
	obs := 2*epDrainTimout + 2*time.Second // observation window after SIGTERM
	ctx, cancel := context.WithTimeout(ctx, obs+30*time.Second)
	defer cancel()
	ss, err := openStreams(ctx, addr, streams)
	if err != nil {
		return err
	}
	defer ss.close()
	tTerm := time.Now()
	if err := p.signal(syscall.SIGTERM); err != nil {
		return err
	}
	r.TermRefusedAfter, r.TermExit = -1, -1
	buf := make([]byte, 4096)
	for time.Since(tTerm) < obs {
		if r.TermExit < 0 && p.exited() {
			r.TermExit = time.Since(tTerm).Seconds()
		}
		d := net.Dialer{Timeout: time.Second}
		pc, err := d.DialContext(ctx, "tcp", addr)
		switch {
		case errors.Is(err, syscall.ECONNREFUSED):
			if r.TermRefusedAfter < 0 {
				r.TermRefusedAfter = ms(time.Since(tTerm))
			}
		case err == nil:
			_ = pc.Close()
			r.TermAccepted++
			sctx, scancel := context.WithTimeout(ctx, 2*time.Second)
			if oneShot(sctx, addr, buf) == nil {
				r.TermServed++
			}
			scancel()
		}
		alive := slices.IndexFunc(ss.lastLines(), func(t time.Time) bool { return time.Since(t) < time.Second }) >= 0
		if !alive && p.exited() && time.Since(tTerm) > 2*time.Second {
			break
		}
		sleepCtx(ctx, 25*time.Millisecond)
	}
	if r.TermExit < 0 && p.exited() {
		r.TermExit = time.Since(tTerm).Seconds()
	}
	ss.close()
	surv := make([]float64, streams)
	for i, t := range ss.lastLines() {
		surv[i] = max(0, t.Sub(tTerm).Seconds())
	}
	r.TermStreams = streams
	r.TermSurviveMedian = median(surv)
	r.TermSurviveMax = slices.Max(surv)
	return nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

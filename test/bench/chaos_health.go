package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// The health scenarios: failures a node-local balancer must not turn into
// an outage of its own.
const (
	// silentClients connect to the balancer and never send a byte, for
	// silentFor, in front of upstreams that close a connection whose TLS
	// handshake has not arrived within silentHandshake.
	silentClients   = 30
	silentFor       = 20 * time.Second
	silentHandshake = 2 * time.Second
	// allUnreadyFor is how long every upstream's /readyz answers 500 (as
	// in an etcd outage) while allUnreadyStreams long-lived streams are open.
	allUnreadyFor     = 15 * time.Second
	allUnreadyStreams = 10
	// streamStall is how long a stream may go without a line (it sends
	// one every 100 ms) before it counts as cut.
	streamStall = time.Second
)

// silentResult is what silentClients silent connections did to a balancer.
type silentResult struct {
	Clients int
	Seconds float64
	// ReadyzShare is the share of 100 ms samples in which the balancer's
	// /readyz answered 200; -1 for a balancer without one.
	ReadyzShare float64
	// Downs counts upstream transitions from up to anything else in the
	// balancer's /status; -1 for a balancer without one.
	Downs                   int
	Total, Failed           int
	FreshTotal, FreshFailed int
	// Closed silent connections were closed by the balancer within
	// Seconds, CloseMedian seconds after they connected (median).
	Closed      int
	CloseMedian float64
}

// allUnreadyResult is what a balancer did while every upstream was unready.
type allUnreadyResult struct {
	Seconds float64
	Streams int
	// Cut streams ended, or stalled for streamStall, during the window;
	// FirstCut is the earliest of their last lines, in seconds after every
	// upstream turned unready (-1 if none was cut).
	Cut                     int
	FirstCut                float64
	Total, Failed           int
	FreshTotal, FreshFailed int
	ReadyzShare             float64
}

// readinessPoller samples extractedprism's /readyz and /status every 100 ms.
type readinessPoller struct {
	mu      sync.Mutex
	samples []readinessSample
	cancel  context.CancelFunc
	done    chan struct{}
}

type readinessSample struct {
	at     time.Time
	ok     bool
	states map[string]string
}

func pollReadiness(ctx context.Context) *readinessPoller {
	ctx, cancel := context.WithCancel(ctx)
	rp := &readinessPoller{cancel: cancel, done: make(chan struct{})}
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	get := func(path string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+epHealthAddr+path, nil)
		if err != nil {
			return nil, err
		}
		return c.Do(req)
	}
	go func() {
		defer close(rp.done)
		for ctx.Err() == nil {
			s := readinessSample{at: time.Now(), states: map[string]string{}}
			if resp, err := get("/readyz"); err == nil {
				s.ok = resp.StatusCode == http.StatusOK
				_ = resp.Body.Close()
			}
			if resp, err := get("/status"); err == nil {
				var doc struct {
					Upstreams []struct {
						Address string `json:"address"`
						State   string `json:"state"`
					} `json:"upstreams"`
				}
				if json.NewDecoder(resp.Body).Decode(&doc) == nil {
					for _, u := range doc.Upstreams {
						s.states[u.Address] = u.State
					}
				}
				_ = resp.Body.Close()
			}
			if ctx.Err() != nil {
				return
			}
			rp.mu.Lock()
			rp.samples = append(rp.samples, s)
			rp.mu.Unlock()
			sleepCtx(ctx, 100*time.Millisecond)
		}
	}()
	return rp
}

// stop ends the polling and returns the share of samples in [from, to]
// with /readyz 200 and the number of up -> not-up transitions.
func (rp *readinessPoller) stop(from, to time.Time) (share float64, downs int) {
	rp.cancel()
	<-rp.done
	var n, ok int
	prev := map[string]string{}
	for _, s := range rp.samples {
		for addr, st := range s.states {
			if !s.at.Before(from) && !s.at.After(to) && prev[addr] == "up" && st != "up" {
				downs++
			}
			prev[addr] = st
		}
		if s.at.Before(from) || s.at.After(to) {
			continue
		}
		n++
		if s.ok {
			ok++
		}
	}
	if n > 0 {
		share = float64(ok) / float64(n)
	}
	return share, downs
}

// freshWindow counts the new-connection requests started in [from, to)
// and how many failed.
func freshWindow(evs []chaosEvent, from, to time.Time) (total, failed int) {
	for _, e := range evs {
		if !e.fresh || e.at.Before(from) || !e.at.Before(to) {
			continue
		}
		total++
		if e.failed {
			failed++
		}
	}
	return total, failed
}

// chaosSilent: silentClients connections to the balancer that never send a
// byte, for silentFor, under the chaos load, in front of upstreams with a
// silentHandshake handshake timeout. A silent client is no upstream
// failure: nothing should be marked down and no request should fail.
func (e *env) chaosSilent(ctx context.Context, name string, r *chaosResult) error {
	addr := e.targets(name)[0]
	l := startChaosLoad(ctx, addr)
	var rp *readinessPoller
	if name == nameEP {
		rp = pollReadiness(ctx)
	}
	sleepCtx(ctx, time.Second)
	from := time.Now()
	closed := make([]time.Duration, silentClients)
	conns := make([]net.Conn, 0, silentClients)
	var wg sync.WaitGroup
	var dialErr error
	for i := range silentClients {
		d := net.Dialer{Timeout: 5 * time.Second}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			dialErr = fmt.Errorf("silent client %d: %w", i, err)
			break
		}
		conns = append(conns, c)
		closed[i] = -1
		wg.Go(func() {
			buf := make([]byte, 512)
			for {
				if _, err := c.Read(buf); err != nil {
					if time.Since(from) < silentFor+time.Second {
						closed[i] = time.Since(from)
					}
					return
				}
			}
		})
	}
	sleepCtx(ctx, silentFor)
	to := time.Now()
	for _, c := range conns {
		_ = c.Close()
	}
	wg.Wait()
	evs := l.stop()
	s := &silentResult{Clients: len(conns), Seconds: silentFor.Seconds(), ReadyzShare: -1, Downs: -1}
	if rp != nil {
		s.ReadyzShare, s.Downs = rp.stop(from, to)
	}
	s.Total, s.Failed, _ = window(r, "silent", evs, from, to)
	s.FreshTotal, s.FreshFailed = freshWindow(evs, from, to)
	var ends []float64
	for _, d := range closed {
		if d >= 0 && d <= to.Sub(from) {
			ends = append(ends, d.Seconds())
		}
	}
	s.Closed, s.CloseMedian = len(ends), median(ends)
	r.Silent = s
	return dialErr
}

// chaosAllUnready: allUnreadyStreams streams open and the chaos load
// running, every upstream answers 500 on /readyz (/healthz stays 200; they
// keep serving, as apiservers do from their caches in an etcd outage) for
// allUnreadyFor. There is no better upstream to move to: no stream should
// be cut and no new request should fail.
func (e *env) chaosAllUnready(ctx context.Context, name string, r *chaosResult) error {
	addr := e.targets(name)[0]
	ss, err := openStreams(ctx, addr, allUnreadyStreams)
	if err != nil {
		return err
	}
	defer ss.close()
	l := startChaosLoad(ctx, addr)
	var rp *readinessPoller
	if name == nameEP {
		rp = pollReadiness(ctx)
	}
	sleepCtx(ctx, time.Second)
	c := newHTTPClient(5 * time.Second)
	defer c.CloseIdleConnections()
	setAll := func(path string) error {
		var errs []string
		for _, u := range e.upstreams {
			if code, err := post(ctx, c, u.addr, path); err != nil || code != http.StatusOK {
				errs = append(errs, fmt.Sprintf("upstream %s: POST %s: %d %v", u.name, path, code, err))
			}
		}
		if len(errs) > 0 {
			return fmt.Errorf("%s", strings.Join(errs, "; "))
		}
		return nil
	}
	from := time.Now()
	errUnready := setAll("/control/unready")
	sleepCtx(ctx, allUnreadyFor)
	to := time.Now()
	errReady := setAll("/control/ready")
	evs := l.stop()
	a := &allUnreadyResult{Seconds: allUnreadyFor.Seconds(), Streams: allUnreadyStreams, FirstCut: -1, ReadyzShare: -1}
	if rp != nil {
		a.ReadyzShare, _ = rp.stop(from, to)
	}
	for _, last := range ss.cutBetween(from, to) {
		a.Cut++
		if at := last.Sub(from).Seconds(); a.FirstCut < 0 || at < a.FirstCut {
			a.FirstCut = max(0, at)
		}
	}
	a.Total, a.Failed, _ = window(r, "allunready", evs, from, to)
	a.FreshTotal, a.FreshFailed = freshWindow(evs, from, to)
	r.AllUnready = a
	if errUnready != nil {
		return errUnready
	}
	return errReady
}

// streamSet is n long-lived GET /stream responses through a balancer, one
// connection each, like a node's watches.
type streamSet struct {
	mu      sync.Mutex
	last    []time.Time // time of each stream's last line
	lines   []int
	ended   []time.Time // zero while the stream runs
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	clients []*httpClient
}

// openStreams opens n streams through addr and returns once each has
// delivered two lines.
func openStreams(ctx context.Context, addr string, n int) (*streamSet, error) {
	ctx, cancel := context.WithCancel(ctx)
	ss := &streamSet{last: make([]time.Time, n), lines: make([]int, n), ended: make([]time.Time, n), cancel: cancel}
	for i := range n {
		c := newHTTPClient(0)
		ss.clients = append(ss.clients, c)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+"/stream?interval=100ms", nil)
		if err != nil {
			ss.close()
			return nil, err
		}
		resp, err := c.Do(req)
		if err != nil {
			ss.close()
			return nil, fmt.Errorf("open stream %d: %w", i, err)
		}
		ss.wg.Go(func() {
			defer func() { _ = resp.Body.Close() }()
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				ss.mu.Lock()
				ss.last[i] = time.Now()
				ss.lines[i]++
				ss.mu.Unlock()
			}
			ss.mu.Lock()
			ss.ended[i] = time.Now()
			ss.mu.Unlock()
		})
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		ss.mu.Lock()
		ok := slices.IndexFunc(ss.lines, func(k int) bool { return k < 2 }) < 0
		ss.mu.Unlock()
		if ok {
			return ss, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			ss.close()
			return nil, fmt.Errorf("streams through %s: not every stream delivered two lines within 20 s", addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// lastLines returns each stream's last line time.
func (ss *streamSet) lastLines() []time.Time {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return slices.Clone(ss.last)
}

// cutBetween returns the last line times of the streams that ended in
// [from, to] or sent nothing for streamStall before to.
func (ss *streamSet) cutBetween(from, to time.Time) []time.Time {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	var out []time.Time
	for i, last := range ss.last {
		end := ss.ended[i]
		if (!end.IsZero() && !end.Before(from) && !end.After(to)) || (end.IsZero() && to.Sub(last) > streamStall) {
			out = append(out, last)
		}
	}
	return out
}

// close ends every stream and waits for its reader.
func (ss *streamSet) close() {
	ss.cancel()
	ss.wg.Wait()
	for _, c := range ss.clients {
		c.CloseIdleConnections()
	}
}

// mergeResults keeps prev and replaces what cur measured: the throughput
// figures when perf is set, and the chaos scenarios named in ran.
func mergeResults(prev, cur results, ran []string, perf bool) results {
	out := prev
	if perf {
		out.Machine, out.Setups, out.Missing, out.Params = cur.Machine, cur.Setups, cur.Missing, cur.Params
		out.Runs, out.Median, out.Spread, out.Starts = cur.Runs, cur.Median, cur.Spread, cur.Starts
		out.Duration = cur.Duration
		out.Baseline = cur.Baseline
	}
	if out.Chaos == nil {
		out.Chaos = map[string]chaosResult{}
	}
	for b, c := range cur.Chaos {
		d := out.Chaos[b]
		for _, sc := range scenarios {
			if !slices.Contains(ran, sc.name) {
				continue
			}
			sc.merge(&d, &c)
			if sc.failures != "" {
				if d.Failures == nil {
					d.Failures = map[string][]string{}
				}
				delete(d.Failures, sc.failures)
				if f := c.Failures[sc.failures]; len(f) > 0 {
					d.Failures[sc.failures] = f
				}
			}
			prefix := sc.name + ": "
			d.Errors = slices.DeleteFunc(d.Errors, func(s string) bool { return strings.HasPrefix(s, prefix) })
			for _, err := range c.Errors {
				if strings.HasPrefix(err, prefix) {
					d.Errors = append(d.Errors, err)
				}
			}
		}
		out.Chaos[b] = d
	}
	if !perf && len(ran) > 0 {
		if out.Notes == nil {
			out.Notes = map[string][]string{}
		}
		// A note of an earlier merge goes once all its scenarios are
		// measured again.
		out.Notes["chaos"] = slices.DeleteFunc(out.Notes["chaos"], func(s string) bool {
			list, ok := strings.CutPrefix(s, "the ")
			list, _, found := strings.Cut(list, " scenarios were measured on ")
			if !ok || !found {
				return false
			}
			for _, n := range strings.Split(list, ", ") {
				if !slices.Contains(ran, n) {
					return false
				}
			}
			return true
		})
		out.Notes["chaos"] = append(out.Notes["chaos"], fmt.Sprintf("the %s scenarios were measured on %s with %s and merged into the figures of the run of %s.",
			strings.Join(ran, ", "), cur.Machine.Date, cur.Machine.ExtractedPrism, prev.Machine.Date))
	}
	mergeSlow(&out, prev, cur)
	return out
}

// mergeSlow keeps the slow-reader figures of the run that measured them
// last: this one's if it did, else the earlier run's.
func mergeSlow(out *results, prev, cur results) {
	from := prev.Slow
	if len(cur.Slow) > 0 {
		from = cur.Slow
	}
	out.Slow = from
	// out.Median is a map shared with prev or cur: write a copy.
	med := make(map[string]perfResult, len(out.Median))
	for s, m := range out.Median {
		m.SlowRSSKiB, m.SlowPSSKiB = 0, 0
		if r, ok := from[s]; ok {
			m.SlowRSSKiB, m.SlowPSSKiB = r.RSSPerReader(), r.PSSPerReader()
		}
		med[s] = m
	}
	out.Median = med
}

// String renders the figures for the harness's log.
func (s *silentResult) String() string { return fmt.Sprintf("%+v", *s) }

// String renders the figures for the harness's log.
func (a *allUnreadyResult) String() string { return fmt.Sprintf("%+v", *a) }

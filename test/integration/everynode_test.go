//go:build linux

package integration

import (
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Health decisions under the stress a balancer on every node exists for:
// clients it was not tuned for, a cluster-wide outage, an overloaded
// cluster, and the difference between a hung, a dead and a stopping
// apiserver.

// metricSum returns the sum of every sample of the metric name.
func metricSum(t testing.TB, d *daemonProc, name string) float64 {
	t.Helper()
	code, body, err := d.get("/metrics")
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", code, err)
	}
	var sum float64
	for line := range strings.SplitSeq(body, "\n") {
		if line == name || strings.HasPrefix(line, name+" ") || strings.HasPrefix(line, name+"{") {
			f := strings.Fields(line)
			v, err := strconv.ParseFloat(f[len(f)-1], 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			sum += v
		}
	}
	return sum
}

// readyzWatch polls /readyz until stopped and counts the answers.
type readyzWatch struct {
	d        *daemonProc
	quit     chan struct{}
	done     chan struct{}
	ok, fail int
	lastBad  string
}

func watchReadyz(d *daemonProc) *readyzWatch {
	w := &readyzWatch{d: d, quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			code, body, err := d.get("/readyz")
			if err == nil && code == http.StatusOK {
				w.ok++
			} else {
				w.fail++
				w.lastBad = fmt.Sprintf("%d %s %v", code, strings.TrimSpace(body), err)
			}
			select {
			case <-w.quit:
				return
			case <-tick.C:
			}
		}
	}()
	return w
}

func (w *readyzWatch) stop() (ok, fail int, lastBad string) {
	close(w.quit)
	<-w.done
	return w.ok, w.fail, w.lastBad
}

// upstreamsUnchanged fails the test if any upstream is not up or changed
// state since before.
func upstreamsUnchanged(t *testing.T, d *daemonProc, before map[string]time.Time, what string) {
	t.Helper()
	for _, u := range d.status(t).Upstreams {
		if u.State != "up" || !u.Since.Equal(before[u.Address]) {
			t.Errorf("%s: upstream %s is %s since %s (%s); want up since %s",
				what, u.Address, u.State, u.Since.Format(time.StampMilli), u.Reason, before[u.Address].Format(time.StampMilli))
		}
	}
}

func sinceByAddr(t *testing.T, d *daemonProc) map[string]time.Time {
	out := map[string]time.Time{}
	for _, u := range d.status(t).Upstreams {
		out[u.Address] = u.Since
	}
	return out
}

// TestSilentClientsMarkNothingDown: 30 clients connect and never send a
// byte, for longer than the apiservers' handshake timeout (2 s here,
// kube-apiserver's is 32 s). The upstreams close them; nothing may be
// marked down and /readyz must answer 200 throughout.
func TestSilentClientsMarkNothingDown(t *testing.T) {
	ss := startStandins(t, 3, "--handshake-timeout", "2s")
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))
	before := sinceByAddr(t, d)
	w := watchReadyz(d)

	const clients, hold = 30, 20 * time.Second
	deadline := time.Now().Add(hold)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var closedByUpstream, connects int
	for range clients {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				c, err := net.DialTimeout("tcp", d.listen, requestTimeout)
				if err != nil {
					return
				}
				mu.Lock()
				connects++
				mu.Unlock()
				_ = c.SetReadDeadline(deadline)
				_, err = c.Read(make([]byte, 1)) // silent: wait for the other side
				_ = c.Close()
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					return
				}
				mu.Lock()
				closedByUpstream++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	ok, fail, lastBad := w.stop()
	upstreamsUnchanged(t, d, before, "after silent clients")
	if fail > 0 {
		t.Errorf("/readyz failed %d of %d polls while silent clients held connections (last: %s), want 0", fail, ok+fail, lastBad)
	}
	if failures := metricSum(t, d, "extractedprism_upstream_dial_failures_total"); failures != 0 {
		t.Errorf("%v upstream failures counted for silent clients, want 0", failures)
	}
	t.Logf("silent clients: %d clients for %s, %d connects, %d closed by their upstream's handshake timeout and passed on; /readyz 200 in %d of %d polls",
		clients, hold, connects, closedByUpstream, ok, ok+fail)
}

// TestAllUnreadyKeepsEveryStream: every apiserver answers "not ready" for
// 15 s (an etcd outage) while watch-like streams are open: no stream may
// be cut, since there is nowhere better to go, and new connections are
// still served.
func TestAllUnreadyKeepsEveryStream(t *testing.T) {
	ss := startStandins(t, 3)
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))
	var streams []*stream
	for range 10 {
		streams = append(streams, openStream(t, d.listen, 200*time.Millisecond))
	}
	l := startLoad(t, d.listen, 2)
	for _, s := range ss {
		s.setReady(t, false)
	}
	outageAt := time.Now()
	for _, s := range ss {
		d.waitState(t, s.addr, "down", waitTimeout)
	}
	// Hold the outage for 15 s in all, then end it.
	waitFor(t, 30*time.Second, "the outage to last 15 s", func() (bool, string) {
		return time.Since(outageAt) >= 15*time.Second, "" // a deadline, not synchronisation
	})
	for _, s := range ss {
		s.setReady(t, true)
	}
	d.waitAllUp(t, addrsOf(ss))
	for _, s := range streams {
		s.waitLines(t, 1, waitTimeout) // proves it still flows
	}
	l.stop()
	rs := l.snapshot()
	cut := 0
	for _, s := range streams {
		if s.ended() {
			cut++
		}
	}
	closed := metricSum(t, d, "extractedprism_closed_on_down_total")
	if cut != 0 || closed != 0 {
		t.Errorf("%d of %d streams ended, %v closed by close_on_down during an outage of every upstream; want 0", cut, len(streams), closed)
	}
	reportFailures(t, rs)
	t.Logf("all upstreams unready for %s: %d of %d streams cut, %d new requests, %d failed",
		time.Since(outageAt).Round(time.Second), cut, len(streams), len(rs), len(failures(rs)))
}

// placeStreams opens n streams and returns those that ride on victim.
func placeStreams(t *testing.T, d *daemonProc, victim string, n int) (on, off []*stream) {
	t.Helper()
	for range n {
		s := openStream(t, d.listen, 100*time.Millisecond)
		if s.server == victim {
			on = append(on, s)
		} else {
			off = append(off, s)
		}
	}
	return on, off
}

// TestHungUpstreamClosesSpread: an apiserver that stops answering
// (SIGSTOP) has its connections closed by the balancer, each at its own
// moment within proxy.close_spread (5 s), not all in one instant.
func TestHungUpstreamClosesSpread(t *testing.T) {
	ss := startStandins(t, 3)
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))
	victim := ss[0]
	on, off := placeStreams(t, d, victim.name, 30)
	if len(on) < 6 {
		t.Fatalf("only %d of 30 streams on %s, want about 10 (least connections)", len(on), victim.name)
	}
	victim.signal(syscall.SIGSTOP)
	t.Cleanup(func() { victim.signal(syscall.SIGCONT) })
	stoppedAt := time.Now()
	d.waitState(t, victim.addr, "down", waitTimeout)
	var ends []time.Time
	for _, s := range on {
		waitFor(t, waitTimeout, "the hung upstream's stream to be closed", func() (bool, string) { return s.ended(), "open" })
		at, _ := s.end()
		ends = append(ends, at)
	}
	slices.SortFunc(ends, func(a, b time.Time) int { return a.Compare(b) })
	span := ends[len(ends)-1].Sub(ends[0])
	if span < time.Second {
		t.Errorf("%d streams of the hung upstream closed within %s, want spread over close_spread (5s)", len(on), span)
	}
	if last := ends[len(ends)-1].Sub(stoppedAt); last > probeInterval*probeFall+probeTimeout+5*time.Second+5*time.Second {
		t.Errorf("last stream closed %s after the hang, want within detection + close_spread (+5s slack)", last)
	}
	for _, s := range off {
		if s.ended() {
			t.Error("a stream on a healthy upstream was closed")
		}
	}
	t.Logf("hung upstream (SIGSTOP): %d streams closed from %s to %s after the hang, spread over %s",
		len(on), describe(ends[0].Sub(stoppedAt)), describe(ends[len(ends)-1].Sub(stoppedAt)), describe(span))
}

// TestDeadOrStoppingUpstreamConnectionsNotCut: an apiserver that is killed
// (the kernel resets its connections) or stops gracefully (it closes its
// listener and lets requests in flight finish) refuses connects; the
// balancer must not cut the connections that ride on it.
func TestDeadOrStoppingUpstreamConnectionsNotCut(t *testing.T) {
	ss := startStandins(t, 3, "--shutdown-timeout", "4s")
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))
	killed, stopping := ss[0], ss[1]
	onKilled, _ := placeStreams(t, d, killed.name, 15)
	onStopping, _ := placeStreams(t, d, stopping.name, 15)
	if len(onKilled) == 0 || len(onStopping) == 0 {
		t.Fatal("no stream on the upstreams to stop")
	}
	killed.kill()
	stopping.signal(syscall.SIGTERM)
	termAt := time.Now()
	d.waitState(t, killed.addr, "down", waitTimeout)
	d.waitState(t, stopping.addr, "down", waitTimeout)
	if _, ok := stopping.wait(waitTimeout); !ok {
		t.Fatal("the stopping stand-in did not exit")
	}
	exitedAt := time.Now()
	for _, s := range append(onKilled, onStopping...) {
		waitFor(t, waitTimeout, "the streams of the stopped upstreams to end", func() (bool, string) { return s.ended(), "open" })
	}
	// Their upstream legs ended (the kernel, the stand-in's shutdown); the
	// client legs are still open, so a balancer that cut them would count
	// them here.
	if closed := metricSum(t, d, "extractedprism_closed_on_down_total"); closed != 0 {
		t.Errorf("the balancer closed %v connections of a dead or stopping upstream, want 0", closed)
	}
	t.Logf("killed and gracefully stopping upstreams: %d + %d streams, none cut by the balancer; the stopping one's ended with its exit %s after SIGTERM",
		len(onKilled), len(onStopping), describe(exitedAt.Sub(termAt)))
}

// setSlow makes a stand-in answer d late (0: at once).
func (s *standinProc) setSlow(t testing.TB, d time.Duration) {
	t.Helper()
	path := "/control/fast"
	if d > 0 {
		path = "/control/slow?delay=" + d.String()
	}
	s.control(t, path)
}

// TestAllSlowMarksNoneDown: every apiserver answers 6 s late (overloaded),
// longer than the probe timeout and first_byte_timeout: none may be taken
// down, /readyz stays 200, and a request through the balancer is answered,
// late.
func TestAllSlowMarksNoneDown(t *testing.T) {
	ss := startStandins(t, 3)
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))
	before := sinceByAddr(t, d)
	w := watchReadyz(d)
	for _, s := range ss {
		s.setSlow(t, 6*time.Second)
	}
	slowAt := time.Now()
	name, err := getRoot(d.listen)
	took := time.Since(slowAt)
	// Keep them slow for several probe rounds.
	waitFor(t, 30*time.Second, "12 s of slowness", func() (bool, string) { return time.Since(slowAt) >= 12*time.Second, "" })
	upstreamsUnchanged(t, d, before, "while every upstream was slow")
	for _, s := range ss {
		s.setSlow(t, 0)
	}
	ok, fail, lastBad := w.stop()
	if err != nil {
		t.Errorf("request while every upstream was slow: %v, want a late answer", err)
	}
	if fail > 0 {
		t.Errorf("/readyz failed %d of %d polls while every upstream was slow (last: %s)", fail, ok+fail, lastBad)
	}
	t.Logf("all upstreams slow (6 s): none marked down; a request was answered by %s after %s; /readyz 200 in %d of %d polls",
		name, describe(took), ok, ok+fail)
}

//go:build linux

package integration

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// probeFall is the daemon's default probe.fall.
const probeFall = 2

// TestHungUpstreamMarkedDown: an upstream that was healthy hangs (accepts
// TCP, answers nothing, not even on the probe's kept-alive connection). It
// must be marked down within interval*fall + timeout (plus slack for a
// loaded machine), client requests must all succeed meanwhile (a
// connection sent there before the mark has its handshake replayed
// elsewhere), and afterwards no client connection may go there.
func TestHungUpstreamMarkedDown(t *testing.T) {
	ss := startStandins(t, 3)
	f := startFreezer(t, ss[2].addr)
	eps := []string{ss[0].addr, ss[1].addr, f.addr()}
	d := startDaemon(t, eps)
	d.waitReady(t)
	d.waitAllUp(t, eps)

	l := startLoad(t, d.listen, 3)
	waitFor(t, 2*waitTimeout, "a client request answered through the upstream that will hang", func() (bool, string) {
		for _, r := range l.snapshot() {
			if r.server == ss[2].name {
				return true, ""
			}
		}
		return false, "none yet"
	})

	// Hang between requests: a request already past its TLS handshake on
	// an apiserver that hangs is lost with any balancer. A connection that
	// has not had the upstream's first byte must not be: its handshake is
	// replayed elsewhere.
	l.gate.Lock()
	frozeAt := time.Now()
	f.freeze()
	l.gate.Unlock()
	detect := d.waitState(t, f.addr(), "down", waitTimeout)
	bound := probeInterval*probeFall + probeTimeout
	const slack = 3 * time.Second
	if detect > bound+slack {
		t.Errorf("hung upstream marked down %s after it hung, want within interval*fall+timeout = %s (+%s slack)", detect, bound, slack)
	}
	l.waitRequests(t, 30) // connections picked before the mark have arrived
	before := f.clients.Load()
	l.waitRequests(t, 150)
	after := f.clients.Load()
	l.stop()
	if after != before {
		t.Errorf("%d new client connections reached the hung upstream after it was marked down, want 0", after-before)
	}
	rs := l.snapshot()
	reportFailures(t, rs)
	var afterFreeze int
	for _, r := range rs {
		if r.at.After(frozeAt) {
			afterFreeze++
			if r.server == ss[2].name {
				t.Errorf("a request completed after the freeze was answered through the hung upstream")
			}
		}
	}
	t.Logf("hung upstream: marked down %s after it hung (bound interval*fall+timeout = %s); %d client requests, %d after the hang, %d failed; client connections that reached it: %d (none after the mark); accepts incl. probes: %d",
		describe(detect), bound, len(rs), afterFreeze, len(failures(rs)), after, f.accepts.Load())
	logMetrics(t, d, "extractedprism_replays_total", "extractedprism_failovers_total", "extractedprism_closed_on_down_total")
}

// TestHungFromStart: an endpoint that accepts TCP but never answers from
// the start is marked down by its first probe, does not delay readiness,
// and never gets a client connection.
func TestHungFromStart(t *testing.T) {
	ss := startStandins(t, 2)
	f := startFreezer(t, ss[0].addr)
	f.freeze()
	eps := []string{ss[0].addr, ss[1].addr, f.addr()}
	d := startDaemon(t, eps)
	d.waitReady(t)
	detect := d.waitState(t, f.addr(), "down", waitTimeout)
	sinceStart := time.Since(d.started)
	if bound := probeTimeout + 5*time.Second; sinceStart > bound {
		t.Errorf("endpoint that never answers marked down %s after start, want within a probe timeout (%s, +5s slack)", sinceStart, probeTimeout)
	}
	l := startLoad(t, d.listen, 3)
	l.waitRequests(t, 150)
	l.stop()
	rs := l.snapshot()
	reportFailures(t, rs)
	if n := f.clients.Load(); n != 0 {
		t.Errorf("%d client connections reached the endpoint that never answers, want 0", n)
	}
	t.Logf("hung from start: marked down %s after the daemon started (%s after it answered on the admin port); %d client requests, %d failed, %d reached it; probe connections accepted: %d",
		describe(sinceStart), describe(detect), len(rs), len(failures(rs)), f.clients.Load(), f.accepts.Load())
}

// TestUnreadyUpstreamDrained: an upstream whose /readyz answers 500 while
// TCP still works is marked down; its established connections (a long
// watch-like stream) are closed, streams on other upstreams go on, and no
// new connection goes there.
func TestUnreadyUpstreamDrained(t *testing.T) {
	ss := startStandins(t, 3)
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))
	victim := ss[0]

	// Least-connections spreads concurrent streams; open them until one
	// rides on the victim and one on another stand-in.
	var onVictim, onOther *stream
	for i := 0; i < 12 && (onVictim == nil || onOther == nil); i++ {
		s := openStream(t, d.listen, 100*time.Millisecond)
		switch {
		case s.server == victim.name && onVictim == nil:
			onVictim = s
		case s.server != victim.name && onOther == nil:
			onOther = s
		}
	}
	if onVictim == nil || onOther == nil {
		t.Fatal("could not place one stream on the victim and one elsewhere")
	}

	unreadyAt := time.Now()
	victim.setReady(t, false)
	detect := d.waitState(t, victim.addr, "down", waitTimeout)
	waitFor(t, waitTimeout, "the victim's stream to be closed", func() (bool, string) {
		n, _ := onVictim.count()
		return onVictim.ended(), fmt.Sprintf("still open after %d lines", n)
	})
	endedAt, _ := onVictim.end()
	onOther.waitLines(t, 5, waitTimeout)
	if onOther.ended() {
		t.Error("the stream on a healthy upstream was closed too")
	}

	// TCP to the victim still works, but no new connection may go there.
	l := startLoad(t, d.listen, 3)
	l.waitRequests(t, 150)
	l.stop()
	rs := l.snapshot()
	reportFailures(t, rs)
	for _, r := range rs {
		if r.server == victim.name {
			t.Errorf("a new connection went to the unready upstream %s", victim.name)
			break
		}
	}
	t.Logf("unready upstream: marked down %s after /readyz turned 500 (seen in /status); its stream closed %s after /readyz turned 500; %d new requests, none to it",
		describe(detect), describe(endedAt.Sub(unreadyAt)), len(rs))
	logMetrics(t, d, "extractedprism_closed_on_down_total")
}

// TestAllUpstreamsDown: with every upstream dead, /readyz answers 503 with
// a reason and a client's connection is closed promptly instead of
// hanging.
func TestAllUpstreamsDown(t *testing.T) {
	ss := startStandins(t, 2)
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	for _, s := range ss {
		s.kill()
		s.wait(waitTimeout)
	}
	var body string
	waitFor(t, waitTimeout, "/readyz 503", func() (bool, string) {
		code, b, err := d.get("/readyz")
		if err != nil {
			return false, err.Error()
		}
		body = b
		return code == http.StatusServiceUnavailable, b
	})
	if !strings.Contains(body, "no healthy upstream") {
		t.Errorf("/readyz body %q does not give the reason (no healthy upstream)", body)
	}

	var worst time.Duration
	for range 5 {
		start := time.Now()
		c, err := net.DialTimeout("tcp", d.listen, requestTimeout)
		if err != nil {
			t.Fatalf("connect to the listener: %v (it must accept and then close)", err)
		}
		_ = c.SetDeadline(time.Now().Add(requestTimeout))
		tc := tls.Client(c, insecureTLS(clientSNI))
		err = tc.Handshake()
		took := time.Since(start)
		_ = tc.Close()
		if err == nil {
			t.Fatal("TLS handshake succeeded with every upstream dead")
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("client connection hung for %s (%v), want it closed promptly", took, err)
		}
		worst = max(worst, took)
	}
	if worst > 5*time.Second {
		t.Errorf("client connection closed after %s, want within a few seconds", worst)
	}
	t.Logf("all upstreams down: /readyz %q; client connections closed after at most %s", strings.TrimSpace(body), describe(worst))
}

// TestSilentClientKeepsUpstreamsUp: a client that connects and closes
// without sending a byte (a TCP port check such as `nc -z` or a tcpSocket
// probe) says nothing about the upstream: no upstream may be marked down
// and /readyz must stay 200.
func TestSilentClientKeepsUpstreamsUp(t *testing.T) {
	ss := startStandins(t, 2)
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))
	before := d.status(t)

	const checks = 6
	for range checks {
		c, err := net.DialTimeout("tcp", d.listen, requestTimeout)
		if err != nil {
			t.Fatalf("connect: %v", err)
		}
		_ = c.Close()
	}
	// Wait until the daemon has handled every one of them.
	waitFor(t, waitTimeout, "the port checks to be handled", func() (bool, string) {
		doc, err := d.tryStatus()
		if err != nil {
			return false, err.Error()
		}
		var total uint64
		for _, u := range doc.Upstreams {
			total += u.TotalConnections
		}
		return doc.ActiveConnections == 0 && total >= checks,
			fmt.Sprintf("%d active, %d proxied", doc.ActiveConnections, total)
	})
	after := d.status(t)
	for i, u := range after.Upstreams {
		if u.State != "up" || !u.Since.Equal(before.Upstreams[i].Since) {
			t.Errorf("upstream %s is %s since %s (%s) after clients connected and closed without sending; want up since %s",
				u.Address, u.State, u.Since.Format(time.StampMilli), u.Reason, before.Upstreams[i].Since.Format(time.StampMilli))
		}
	}
	if code, body, err := d.get("/readyz"); err != nil || code != http.StatusOK {
		t.Errorf("/readyz after silent clients: %d %q %v, want 200", code, body, err)
	}
}

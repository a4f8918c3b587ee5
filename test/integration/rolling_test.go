//go:build linux

package integration

import (
	"syscall"
	"testing"
	"time"
)

// TestRollingRestartUnderLoad restarts three stand-ins one after the other
// with SIGTERM, as a control-plane upgrade does, while clients open a new
// TLS connection per request without any gating. Each stand-in behaves like
// kube-apiserver with --shutdown-delay-duration: /readyz fails first, the
// listener closes after the delay. Connects that land on an apiserver in
// the moment it stops are refused (retried on another upstream) or dropped
// before the first byte (replayed). No client request may fail.
//
// (Without a shutdown delay an apiserver may also close connections whose
// TLS handshake it already answered; no TCP balancer can save those, since
// bytes have reached the client.)
func TestRollingRestartUnderLoad(t *testing.T) {
	// More than the time a busy upstream's readiness may go unprobed
	// (probe.MaxSkipped rounds skipped while traffic flows, then fall
	// failed probes): (4 + 2) x interval x 1.2 = 7.2 s, with room for a
	// loaded machine.
	const delay = "--shutdown-delay=10s"
	ss := make([]*standinProc, 3)
	for i := range ss {
		ss[i] = startStandin(t, string(rune('a'+i)), loopback(freePort(t)), delay)
	}
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))

	l := startLoad(t, d.listen, 4)
	l.waitRequests(t, 60)
	start := time.Now()
	for i, s := range ss {
		s.signal(syscall.SIGTERM)
		if _, ok := s.wait(waitTimeout); !ok {
			t.Fatalf("stand-in %s did not exit on SIGTERM", s.name)
		}
		l.waitRequests(t, 40)
		re := startStandin(t, s.name, s.addr, delay)
		ss[i] = re
		d.waitState(t, re.addr, "up", waitTimeout)
		l.waitRequests(t, 40)
	}
	l.stop()
	rs := l.snapshot()
	reportFailures(t, rs)
	t.Logf("rolling restart of 3 upstreams in %s: %d client requests (new TLS connection each), %d failed",
		describe(time.Since(start)), len(rs), len(failures(rs)))
	logMetrics(t, d, "extractedprism_failovers_total", "extractedprism_replays_total", "extractedprism_upstream_dial_failures_total")
}

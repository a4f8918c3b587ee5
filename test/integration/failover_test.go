//go:build linux

package integration

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestFailoverKillAndRestart: three stand-ins, clients opening a new TLS
// connection per request, one stand-in SIGKILLed and later restarted on
// the same port. No client request may fail.
//
// The kill is made between requests (the load gate): a request already in
// flight on a process that dies is lost with every balancer. What must not
// fail is every connection opened afterwards, while the balancer still
// believes the dead upstream is up.
func TestFailoverKillAndRestart(t *testing.T) {
	ss := startStandins(t, 3)
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))

	l := startLoad(t, d.listen, 4)
	l.waitRequests(t, 60)

	victim := ss[1]
	l.gate.Lock()
	killAt := time.Now()
	victim.kill()
	if _, ok := victim.wait(waitTimeout); !ok {
		l.gate.Unlock()
		t.Fatal("killed stand-in did not exit")
	}
	l.gate.Unlock()
	downAfter := d.waitState(t, victim.addr, "down", waitTimeout)
	downReason := ""
	for _, u := range d.status(t).Upstreams {
		if u.Address == victim.addr {
			downReason = u.Reason
		}
	}
	l.waitRequests(t, 100)

	re := startStandin(t, victim.name, victim.addr)
	restarted := time.Now()
	var backAfter time.Duration
	waitFor(t, 2*waitTimeout, "the restarted stand-in to answer a client again", func() (bool, string) {
		for _, r := range l.snapshot() {
			if r.err == nil && r.server == re.name && r.at.After(restarted) {
				backAfter = r.at.Sub(restarted)
				return true, ""
			}
		}
		st, _, _ := d.upstreamState(re.addr)
		return false, "restarted upstream is " + st
	})
	l.waitRequests(t, 60)
	l.stop()

	rs := l.snapshot()
	reportFailures(t, rs)
	var afterKill, beforeDown int
	perServer := map[string]int{}
	for _, r := range rs {
		perServer[r.server]++
		if r.at.After(killAt) {
			afterKill++
			if r.at.Before(killAt.Add(downAfter)) {
				beforeDown++
			}
		}
	}
	for _, s := range ss {
		if perServer[s.name] == 0 {
			t.Errorf("stand-in %s answered no request; distribution %v", s.name, perServer)
		}
	}
	t.Logf("failover: %d client requests (new TLS connection each), %d failed; %d after the kill, %d of them before it was marked down",
		len(rs), len(failures(rs)), afterKill, beforeDown)
	t.Logf("failover: killed upstream marked down %s after SIGKILL (%s); restarted upstream got traffic again %s after it listened (probe interval %s, rise 2); per server %v",
		describe(downAfter), downReason, describe(backAfter), probeInterval, perServer)
	logMetrics(t, d, "extractedprism_failovers_total", "extractedprism_upstream_dial_failures_total")
}

// logMetrics logs the non-zero /metrics samples whose names start with one
// of names.
func logMetrics(t testing.TB, d *daemonProc, names ...string) {
	t.Helper()
	code, body, err := d.get("/metrics")
	if err != nil || code != http.StatusOK {
		t.Logf("GET /metrics: %d %v", code, err)
		return
	}
	var out []string
	for line := range strings.SplitSeq(body, "\n") {
		for _, n := range names {
			if strings.HasPrefix(line, n) && !strings.HasSuffix(line, " 0") {
				out = append(out, line)
			}
		}
	}
	t.Logf("metrics: %s", fmt.Sprint(out))
}

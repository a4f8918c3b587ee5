//go:build linux

package integration

import (
	"net/http"
	"syscall"
	"testing"
	"time"
)

// TestDrainOnSIGTERM: a lone process (no successor serves its port, as
// for a static pod or a plain SIGTERM) under a client loop with ten open
// streams: after SIGTERM /readyz answers 503, new connections go on being
// served for the whole drain (refusing them would stall the node's clients
// for as long), the streams flow until --drain-timeout and are then cut,
// and the process exits 0.
func TestDrainOnSIGTERM(t *testing.T) {
	const drain = 4 * time.Second
	ss := startStandins(t, 1)
	d := startDaemon(t, addrsOf(ss), "--drain-timeout", drain.String())
	d.waitReady(t)
	var streams []*stream
	for range 10 {
		streams = append(streams, openStream(t, d.listen, 100*time.Millisecond))
	}
	l := startLoad(t, d.listen, 2)
	l.waitRequests(t, 20)

	atTerm := make([]int, len(streams))
	for i, s := range streams {
		atTerm[i], _ = s.count()
	}
	termAt := time.Now()
	d.signal(syscall.SIGTERM)
	waitFor(t, drain, "/readyz 503 during the drain", func() (bool, string) {
		code, body, err := d.get("/readyz")
		if err != nil {
			return false, err.Error()
		}
		return code == http.StatusServiceUnavailable, body
	})
	unready := time.Since(termAt)
	for _, s := range streams {
		waitFor(t, drain+waitTimeout, "the streams to be cut", func() (bool, string) { return s.ended(), "still open" })
	}
	code, ok := d.wait(waitTimeout)
	exitAfter := time.Since(termAt)
	l.stop()
	if !ok {
		t.Fatal("extractedprism still running after the drain")
	}
	if code != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0", code)
	}
	var firstCut, lastCut time.Duration
	for i, s := range streams {
		if n, _ := s.count(); n-atTerm[i] < 20 {
			t.Errorf("stream %d got %d lines during the 4s drain, want it to flow (one per 100ms)", i, n-atTerm[i])
		}
		at, _ := s.end()
		cut := at.Sub(termAt)
		if i == 0 || cut < firstCut {
			firstCut = cut
		}
		lastCut = max(lastCut, cut)
	}
	if firstCut < drain-500*time.Millisecond || lastCut > drain+5*time.Second {
		t.Errorf("streams cut from %s to %s after SIGTERM, want at about the drain timeout %s", firstCut, lastCut, drain)
	}
	// Every request that began before the cut was answered.
	var during, failed int
	var lastOK time.Duration
	for _, r := range l.snapshot() {
		if r.at.Before(termAt) {
			continue
		}
		if r.at.Sub(termAt) < firstCut-time.Second {
			during++
			if r.err != nil {
				failed++
				t.Errorf("a request %s after SIGTERM failed: %v", r.at.Sub(termAt), r.err)
			}
		}
		if r.err == nil {
			lastOK = max(lastOK, r.at.Sub(termAt))
		}
	}
	if during == 0 {
		t.Error("no request completed during the drain")
	}
	t.Logf("drain: /readyz 503 %s after SIGTERM; %d new requests during the drain, %d failed, the last answered %s after SIGTERM; 10 streams cut %s to %s after SIGTERM (drain timeout %s); exit 0 after %s",
		describe(unready), during, failed, describe(lastOK), describe(firstCut), describe(lastCut), drain, describe(exitAfter))
}

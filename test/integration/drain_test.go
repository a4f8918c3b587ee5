//go:build linux

package integration

import (
	"net"
	"net/http"
	"syscall"
	"testing"
	"time"
)

// TestDrainOnSIGTERM: after SIGTERM /readyz answers 503, new connects are
// refused by the kernel, an established stream keeps flowing until
// --drain-timeout and is then cut, and the process exits 0.
func TestDrainOnSIGTERM(t *testing.T) {
	const drain = 4 * time.Second
	ss := startStandins(t, 1)
	d := startDaemon(t, addrsOf(ss), "--drain-timeout", drain.String())
	d.waitReady(t)
	s := openStream(t, d.listen, 100*time.Millisecond)
	s.waitLines(t, 3, waitTimeout)

	termAt := time.Now()
	linesAtTerm, _ := s.count()
	d.signal(syscall.SIGTERM)

	waitFor(t, drain, "/readyz 503 during the drain", func() (bool, string) {
		code, body, err := d.get("/readyz")
		if err != nil {
			return false, err.Error()
		}
		return code == http.StatusServiceUnavailable, body
	})
	unready := time.Since(termAt)
	waitFor(t, drain, "a new connect to be refused", func() (bool, string) {
		c, err := net.DialTimeout("tcp", d.listen, 2*time.Second)
		if err == nil {
			_ = c.Close()
			return false, "connect accepted"
		}
		return isRefused(err), err.Error()
	})
	refused := time.Since(termAt)
	if s.ended() {
		at, err := s.end()
		t.Fatalf("stream ended %s after SIGTERM (%v), want it to flow until the drain timeout %s", at.Sub(termAt), err, drain)
	}
	s.waitLines(t, 10, drain)

	waitFor(t, drain+waitTimeout, "the stream to be cut", func() (bool, string) { return s.ended(), "still open" })
	cutAt, _ := s.end()
	cut := cutAt.Sub(termAt)
	code, ok := d.wait(waitTimeout)
	exitAfter := time.Since(termAt)
	if !ok {
		t.Fatal("extractedprism still running after the drain")
	}
	if code != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0", code)
	}
	if cut < drain-500*time.Millisecond {
		t.Errorf("stream cut %s after SIGTERM, want not before the drain timeout %s", cut, drain)
	}
	if cut > drain+5*time.Second {
		t.Errorf("stream cut %s after SIGTERM, want at about the drain timeout %s", cut, drain)
	}
	lines, _ := s.count()
	t.Logf("drain: /readyz 503 %s after SIGTERM, new connects refused after %s; stream got %d lines during the drain and was cut %s after SIGTERM (drain timeout %s); exit 0 after %s",
		describe(unready), describe(refused), lines-linesAtTerm, describe(cut), drain, describe(exitAfter))
}

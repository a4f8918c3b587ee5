package cluster

import (
	"testing"
	"time"
)

// Poll calls cond every interval until it returns true or timeout passes,
// and returns when it held; it fails t with what the last call said.
func Poll(t testing.TB, what string, timeout, interval time.Duration, cond func() (bool, string)) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, msg := cond()
		if ok {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; last: %s", timeout, what, msg)
		}
		time.Sleep(interval)
	}
}

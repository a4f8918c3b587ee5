//go:build linux

package integration

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestAcceptSurvivesEMFILE runs the daemon with a small RLIMIT_NOFILE
// (prlimit from util-linux), exhausts its descriptors with idle client
// connections and checks that /healthz still answers (the admin listener
// keeps a spare descriptor) and /readyz tells why it is not ready; once
// the connections are released it proxies again.
func TestAcceptSurvivesEMFILE(t *testing.T) {
	const nofile = 64
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Fatalf("prlimit (util-linux) is needed: %v", err)
	}
	ss := startStandins(t, 2)
	d := startDaemonWith(t, []string{prlimit, fmt.Sprintf("--nofile=%d:%d", nofile, nofile), "--"}, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))
	if name, err := getRoot(d.listen); err != nil {
		t.Fatalf("request before exhaustion: %v", err)
	} else {
		t.Logf("before exhaustion: answered by %s; daemon has %d descriptors open of %d", name, openFDs(d.pid()), nofile)
	}

	var idle []net.Conn
	release := func() {
		for _, c := range idle {
			_ = c.Close()
		}
		idle = nil
	}
	t.Cleanup(release)
	var readyBody, healthBody string
	var healthCode int
	waitFor(t, 2*waitTimeout, "/readyz to report the accept error", func() (bool, string) {
		if len(idle) < 8*nofile {
			for range 4 {
				c, err := net.DialTimeout("tcp", d.listen, 5*time.Second)
				if err != nil {
					return false, fmt.Sprintf("connect %d: %v", len(idle)+1, err)
				}
				idle = append(idle, c)
			}
		}
		code, body, err := d.get("/readyz")
		if err != nil {
			return false, fmt.Sprintf("/readyz with %d idle connections: %v", len(idle), err)
		}
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "too many open files") {
			return false, fmt.Sprintf("/readyz with %d idle connections: %d %s", len(idle), code, body)
		}
		readyBody = body
		// Still out of descriptors: /healthz must answer, and say the
		// accept loop is alive.
		healthCode, healthBody, err = d.get("/healthz")
		if err != nil {
			t.Fatalf("/healthz while out of descriptors: %v", err)
		}
		return true, ""
	})
	if healthCode != http.StatusOK {
		t.Errorf("/healthz while out of descriptors: %d %s, want 200 (the accept loop is alive)", healthCode, healthBody)
	}
	exhaustedWith := len(idle)

	release()
	// With the descriptors free again the listener can accept, so /readyz
	// must say ready without waiting for a client to connect first.
	readyAgain := time.Duration(-1)
	released := time.Now()
	deadline := released.Add(10 * time.Second)
	var code int
	var body string
	for time.Now().Before(deadline) {
		code, body, err = d.get("/readyz")
		if err == nil && code == http.StatusOK {
			readyAgain = time.Since(released)
			break
		}
		time.Sleep(pollEvery)
	}
	if readyAgain < 0 {
		t.Errorf("/readyz still %d %q 10 s after the idle connections were released and the descriptors freed (%d open of %d); "+
			"the accept error is stale, the listener can accept", code, strings.TrimSpace(body), openFDs(d.pid()), nofile)
	}
	var name string
	back := waitFor(t, 2*waitTimeout, "the proxy to serve again", func() (bool, string) {
		n, err := getRoot(d.listen)
		if err != nil {
			return false, err.Error()
		}
		name = n
		return true, ""
	})
	d.waitReady(t)
	for i := range 20 {
		if _, err := getRoot(d.listen); err != nil {
			t.Errorf("request %d after recovery: %v", i, err)
		}
	}
	readyText := "never without a new client connection"
	if readyAgain >= 0 {
		readyText = "after " + describe(readyAgain)
	}
	t.Logf("EMFILE: RLIMIT_NOFILE %d exhausted with %d idle client connections; /readyz %q; /healthz %d %q; after release /readyz 200 %s, proxying again (answered by %s) after %s",
		nofile, exhaustedWith, strings.TrimSpace(readyBody), healthCode, strings.TrimSpace(healthBody), readyText, name, describe(back))
}

// openFDs counts the open descriptors of pid (-1 if unknown).
func openFDs(pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	return len(ents)
}

//go:build linux

package integration

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
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
	// Idle connections pin two descriptors each (client and upstream leg).
	// Connect in small batches until /readyz says the daemon is out of
	// descriptors. Everything up to the release must happen well within
	// the stand-ins' 10 s header timeout, which would end the idle pairs.
	var readyBody, healthBody, last string
	var healthCode int
	exhaustStart := time.Now()
	exhausted := false
	for time.Since(exhaustStart) < 6*time.Second && len(idle) < 8*nofile {
		for range 2 {
			c, err := net.DialTimeout("tcp", d.listen, 5*time.Second)
			if err != nil {
				t.Fatalf("connect %d: %v", len(idle)+1, err)
			}
			idle = append(idle, c)
		}
		code, body, err := d.get("/readyz")
		if err != nil {
			t.Fatalf("/readyz with %d idle connections: %v (the admin server must answer while out of descriptors)", len(idle), err)
		}
		last = fmt.Sprintf("%d %s", code, strings.TrimSpace(body))
		if code == http.StatusServiceUnavailable && strings.Contains(body, "too many open files") {
			readyBody, exhausted = body, true
			// Still out of descriptors: /healthz must answer, and say
			// the accept loop is alive.
			healthCode, healthBody, err = d.get("/healthz")
			if err != nil {
				t.Fatalf("/healthz while out of descriptors: %v", err)
			}
			break
		}
	}
	exhaustTook := time.Since(exhaustStart)
	if !exhausted {
		t.Errorf("/readyz never reported running out of descriptors with %d idle client connections (RLIMIT_NOFILE %d); last answer %q",
			len(idle), nofile, last)
	} else if healthCode != http.StatusOK {
		t.Errorf("/healthz while out of descriptors: %d %s, want 200 (the accept loop is alive)", healthCode, healthBody)
	}
	exhaustedWith := len(idle)

	// Give the daemon a moment to work off connects still waiting in the
	// kernel's accept queue: once none is left, no pending connect can
	// make it accept after the release, and /readyz must recover on its
	// own. (It takes a connect whenever a descriptor frees up; if one is
	// still queued the check below is merely easier to pass.)
	drainStart := time.Now()
	queued := -1
	for time.Since(drainStart) < 2*time.Second {
		n, err := acceptQueue(d.listen)
		if err != nil {
			t.Fatal(err)
		}
		if queued = n; n == 0 {
			break
		}
		time.Sleep(pollEvery)
	}
	drainTook := time.Since(drainStart)

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
	t.Logf("EMFILE: phases: exhaustion %s, %d connects left in the accept queue after %s, total %s",
		describe(exhaustTook), queued, describe(drainTook), describe(time.Since(exhaustStart)))
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

// acceptQueue returns the number of connections waiting in the accept
// queue of the IPv4 listener on addr, from /proc/net/tcp (rx_queue of a
// listening socket is its accept queue length).
func acceptQueue(addr string) (int, error) {
	_, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return 0, err
	}
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return 0, err
	}
	want := fmt.Sprintf("0100007F:%04X", port)
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || f[1] != want || f[3] != "0A" {
			continue
		}
		_, rx, ok := strings.Cut(f[4], ":")
		if !ok {
			return 0, fmt.Errorf("/proc/net/tcp: bad queue field %q", f[4])
		}
		n, err := strconv.ParseInt(rx, 16, 64)
		return int(n), err
	}
	return 0, fmt.Errorf("/proc/net/tcp: no listener %s", want)
}

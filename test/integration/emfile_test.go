//go:build linux

package integration

import (
	"encoding/json"
	"errors"
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
// the connections are released it proxies again. The connection cap is
// set above what the descriptors allow (by default it stays below, and a
// connection beyond it is refused instead, see TestDefaultCapStaysWithinDescriptors).
func TestAcceptSurvivesEMFILE(t *testing.T) {
	const nofile = 64
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Fatalf("prlimit (util-linux) is needed: %v", err)
	}
	ss := startStandins(t, 2)
	d := startDaemonWith(t, []string{prlimit, fmt.Sprintf("--nofile=%d:%d", nofile, nofile), "--"}, addrsOf(ss),
		"--max-connections", strconv.Itoa(8*nofile))
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

// TestDefaultCapStaysWithinDescriptors: with a small RLIMIT_NOFILE and no
// proxy.max_connections, the derived cap leaves descriptors to spare: the
// connections up to it are served, the next one is reset at once (never
// left waiting), /readyz stays 200 and /status counts the refusal.
func TestDefaultCapStaysWithinDescriptors(t *testing.T) {
	const nofile = 128
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Fatalf("prlimit (util-linux) is needed: %v", err)
	}
	ss := startStandins(t, 2)
	d := startDaemonWith(t, []string{prlimit, fmt.Sprintf("--nofile=%d:%d", nofile, nofile), "--"}, addrsOf(ss))
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))
	var st struct {
		Active  int64  `json:"active_connections"`
		Max     int64  `json:"max_connections"`
		Refused uint64 `json:"refused_connections"`
	}
	status := func() {
		t.Helper()
		code, body, err := d.get("/status")
		if err != nil || code != http.StatusOK {
			t.Fatalf("/status: %d %v", code, err)
		}
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			t.Fatalf("/status: %v", err)
		}
	}
	status()
	if st.Max <= 0 || 2*st.Max >= nofile {
		t.Fatalf("derived max_connections %d with RLIMIT_NOFILE %d: want two descriptors per connection to fit", st.Max, nofile)
	}
	var open []net.Conn
	t.Cleanup(func() {
		for _, c := range open {
			_ = c.Close()
		}
	})
	for len(open) < int(st.Max) {
		c, err := net.DialTimeout("tcp", d.listen, 5*time.Second)
		if err != nil {
			t.Fatalf("connect %d of %d: %v", len(open)+1, st.Max, err)
		}
		open = append(open, c)
	}
	waitFor(t, waitTimeout, "every connection tracked", func() (bool, string) {
		status()
		return st.Active == st.Max, fmt.Sprintf("%d active of %d", st.Active, st.Max)
	})
	// One more: accepted and reset at once.
	start := time.Now()
	c, err := net.DialTimeout("tcp", d.listen, 5*time.Second)
	if err == nil {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
		_ = c.Close()
	}
	took := time.Since(start)
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection beyond max_connections %d: read %v after %s, want it reset at once", st.Max, err, took)
	}
	if code, body, err := d.get("/readyz"); err != nil || code != http.StatusOK {
		t.Errorf("/readyz at the cap: %d %q %v, want 200 (the open connections are served)", code, body, err)
	}
	waitFor(t, waitTimeout, "the refusal counted", func() (bool, string) {
		status()
		return st.Refused >= 1, fmt.Sprintf("%d refused", st.Refused)
	})
	// The open connections still work, and one freed place takes a new one.
	if _, err := open[0].Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatalf("write on an open connection: %v", err)
	}
	_ = open[0].Close()
	open = open[1:]
	waitFor(t, waitTimeout, "a new connection served once one ended", func() (bool, string) {
		name, err := getRoot(d.listen)
		if err != nil {
			return false, err.Error()
		}
		return true, name
	})
	t.Logf("RLIMIT_NOFILE %d: derived max_connections %d; connection %d reset after %s (%v); /status refused %d",
		nofile, st.Max, st.Max+1, describe(took), err, st.Refused)
}

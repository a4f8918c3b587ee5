//go:build linux

package integration

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// plainDaemon is a build of the daemon without the race detector, whose
// shadow memory would swamp what a memory test measures.
var plainDaemon struct {
	once sync.Once
	path string
	err  error
}

// plainDaemonBin returns the daemon built without -race (daemonBin itself
// when the tests run without it).
func plainDaemonBin(t testing.TB) string {
	t.Helper()
	if !raceEnabled {
		return daemonBin
	}
	plainDaemon.once.Do(func() {
		plainDaemon.path = filepath.Join(filepath.Dir(daemonBin), "extractedprism-norace")
		cmd := exec.Command("go", "build", "-o", plainDaemon.path, "github.com/extractedprism/extractedprism/cmd/extractedprism")
		if out, err := cmd.CombinedOutput(); err != nil {
			plainDaemon.err = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if plainDaemon.err != nil {
		t.Fatal(plainDaemon.err)
	}
	return plainDaemon.path
}

// rssKiB returns a field (VmRSS, VmHWM) of /proc/PID/status in KiB.
func rssKiB(t testing.TB, pid int, field string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read /proc/%d/status: %v", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			if err != nil {
				t.Fatalf("%s in /proc/%d/status: %q", field, pid, line)
			}
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// hugeHeaderClient sends requests to addr whose header is about 1 MiB, one
// after the other on fresh connections, until stop is closed, and counts
// the requests it completed.
func hugeHeaderClient(addr string, stop <-chan struct{}, sent *atomic.Int64) {
	line := "X-Filler: " + strings.Repeat("a", 1000) + "\r\n"
	chunk := []byte(strings.Repeat(line, 64)) // ~64 KiB
	for {
		select {
		case <-stop:
			return
		default:
		}
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			continue
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		done := make(chan struct{})
		go func() {
			defer close(done)
			// Read whatever the server answers (431) until it closes.
			_, _ = bufio.NewReader(c).ReadString(0)
		}()
		_, err = c.Write([]byte("GET /healthz HTTP/1.1\r\nHost: flood\r\n"))
		for i := 0; err == nil && i < 16; i++ { // 16 x 64 KiB = 1 MiB
			_, err = c.Write(chunk)
		}
		if err == nil {
			_, _ = c.Write([]byte("\r\n"))
		}
		sent.Add(1)
		_ = c.Close()
		<-done
	}
}

// TestAdminFloodBoundsMemory floods the admin port of the real daemon with
// 40 clients that each send about 1 MiB of request header, again and
// again: the process's resident memory stays within a few MiB of what it
// was, and /healthz and /readyz keep answering fast all along (they are
// what kubelet probes).
func TestAdminFloodBoundsMemory(t *testing.T) {
	ss := startStandins(t, 1)
	port, adminPort := freePort(t), freePort(t)
	d := &daemonProc{listen: loopback(port), admin: loopback(adminPort)}
	d.proc = startProc(t, "extractedprism (without -race)", nil, plainDaemonBin(t), "--endpoints", ss[0].addr,
		"--bind-port", strconv.Itoa(port), "--health-port", strconv.Itoa(adminPort), "--state-file", "")
	if err := d.waitAdmin(); err != nil {
		t.Fatalf("extractedprism did not come up: %v", err)
	}
	d.waitReady(t)
	// Warm up what a scrape and a status read allocate once.
	for range 3 {
		for _, p := range []string{"/metrics", "/status", "/healthz"} {
			if _, _, err := d.get(p); err != nil {
				t.Fatal(err)
			}
		}
	}
	base := rssKiB(t, d.pid(), "VmRSS")

	const clients = 40
	const flood = 6 * time.Second
	stop := make(chan struct{})
	var sent atomic.Int64
	var wg sync.WaitGroup
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			hugeHeaderClient(d.admin, stop, &sent)
		}()
	}

	// kubelet gives each probe the chart's timeoutSeconds, 5 s.
	const probeDeadline = 5 * time.Second
	var peak int
	var probes, slowProbes int
	var worst time.Duration
	var bad []string
	start := time.Now()
	for time.Since(start) < flood {
		if r := rssKiB(t, d.pid(), "VmRSS"); r > peak {
			peak = r
		}
		for _, p := range []string{"/healthz", "/readyz"} {
			t0 := time.Now()
			code, body, err := d.get(p)
			took := time.Since(t0)
			probes++
			worst = max(worst, took)
			if took > probeDeadline {
				slowProbes++
			}
			if err != nil || code != http.StatusOK {
				bad = append(bad, fmt.Sprintf("%s: %d %q %v", p, code, body, err))
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	wg.Wait()

	grew := peak - base
	t.Logf("RSS before the flood %d KiB, peak during it %d KiB (+%d KiB); %d huge-header requests from %d clients; "+
		"%d probes, slowest %s", base, peak, grew, sent.Load(), clients, probes, worst.Round(time.Millisecond))
	if sent.Load() < clients {
		t.Fatalf("only %d huge-header requests were sent: the flood did not happen", sent.Load())
	}
	// 40 connections each holding 1 MiB would be 40 MiB; capped headers
	// and connections leave a few MiB of buffers and garbage at most.
	const boundKiB = 12 << 10
	if grew > boundKiB {
		t.Errorf("RSS grew by %d KiB under the flood, bound %d KiB", grew, boundKiB)
	}
	if len(bad) > 0 {
		t.Errorf("%d of %d probes failed during the flood, first: %s", len(bad), probes, bad[0])
	}
	if slowProbes > 0 {
		t.Errorf("%d of %d probes took over %s during the flood (slowest %s)", slowProbes, probes, probeDeadline, worst)
	}
}

//go:build linux

package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"
)

// TestProxyIPv6BulkTransfer: the daemon on the IPv6 loopback in front of
// IPv6 endpoints ("[::1]:port"), carrying a large download intact.
func TestProxyIPv6BulkTransfer(t *testing.T) {
	probe, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback on this machine: %v", err)
	}
	_ = probe.Close()
	a := startStandin(t, "a", "[::1]:0")
	b := startStandin(t, "b", "[::1]:0")
	port, adminPort := freePortOn(t, "::1"), freePortOn(t, "::1")
	listen := net.JoinHostPort("::1", strconv.Itoa(port))
	admin := net.JoinHostPort("::1", strconv.Itoa(adminPort))
	d := startDaemonArgs(t, listen, admin, "--endpoints", a.addr+","+b.addr, "--bind-address", "::1",
		"--bind-port", strconv.Itoa(port), "--health-bind-address", "::1", "--health-port", strconv.Itoa(adminPort),
		"--health-interval", probeInterval.String(), "--health-timeout", probeTimeout.String(), "--state-file", "")
	d.waitReady(t)
	d.waitAllUp(t, []string{a.addr, b.addr})
	seen := map[string]bool{}
	for range 4 {
		name, err := getRoot(listen)
		if err != nil {
			t.Fatalf("GET / via %s: %v", listen, err)
		}
		seen[name] = true
	}
	if len(seen) != 2 {
		t.Errorf("requests via %s reached %v, want both stand-ins", listen, seen)
	}

	const size = 64 << 20
	start := time.Now()
	n, err := getBulk(listen, size)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("GET /bulk?bytes=%d via %s: %v", size, listen, err)
	}
	if n != size {
		t.Fatalf("GET /bulk?bytes=%d via %s: got %d bytes", size, listen, n)
	}
	t.Logf("IPv6: %d MiB through %s intact in %s (%.0f MiB/s; race-instrumented binaries on a shared machine, not a benchmark)",
		size>>20, listen, took.Round(time.Millisecond), float64(size>>20)/took.Seconds())
}

// getBulk downloads /bulk?bytes=size via addr and checks the payload
// pattern (a..z repeating); it returns the number of bytes received.
func getBulk(addr string, size int) (int, error) {
	tc, err := dialTLS(addr, requestTimeout)
	if err != nil {
		return 0, err
	}
	defer func() { _ = tc.Close() }()
	_ = tc.SetDeadline(time.Now().Add(2 * time.Minute))
	if _, err := fmt.Fprintf(tc, "GET /bulk?bytes=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", size); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReaderSize(tc, 64<<10), nil)
	if err != nil {
		return 0, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("status %s", resp.Status)
	}
	buf := make([]byte, 256<<10)
	total := 0
	for {
		k, err := resp.Body.Read(buf)
		for i := range k {
			if want := byte('a' + (total+i)%(256<<10)%26); buf[i] != want {
				return total + i, fmt.Errorf("byte %d is %q, want %q", total+i, buf[i], want)
			}
		}
		total += k
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

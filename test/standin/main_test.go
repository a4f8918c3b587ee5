package main

import (
	"bufio"
	"crypto/tls"
	"io"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestRunServesAndStopsOnSignal runs the command in-process: it must print one
// line per listener, toggle readiness on SIGUSR1 and exit 0 on SIGTERM.
func TestRunServesAndStopsOnSignal(t *testing.T) {
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	go func() {
		done <- run([]string{"--listen", "127.0.0.1:0", "--listen", "127.0.0.2:0", "--name", "a", "--log-level", "error"}, pw, io.Discard)
		_ = pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	var addrs []string
	for len(addrs) < 2 && sc.Scan() {
		line := sc.Text()
		addr, ok := strings.CutPrefix(line, "standin a listening on ")
		if !ok {
			t.Fatalf("unexpected stdout line %q", line)
		}
		addrs = append(addrs, addr)
	}
	if len(addrs) != 2 {
		t.Fatalf("got listening lines for %v, want two", addrs)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // self-signed test server
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	readyz := func(addr string) int {
		resp, err := c.Get("https://" + addr + "/readyz")
		if err != nil {
			t.Fatalf("GET /readyz on %s: %v", addr, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	for _, a := range addrs {
		if code := readyz(a); code != http.StatusOK {
			t.Errorf("GET /readyz on %s = %d, want 200", a, code)
		}
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for readyz(addrs[1]) != http.StatusInternalServerError {
		if time.Now().After(deadline) {
			t.Fatal("still ready 30 s after SIGUSR1")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("exit status %d after SIGTERM, want 0", code)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("still running 30 s after SIGTERM")
	}
	_, _ = io.Copy(io.Discard, pr)
}

func TestRunRejectsBadFlags(t *testing.T) {
	for _, args := range [][]string{{"--listen", "nope"}, {"--log-level", "loud"}, {"extra"}} {
		if code := run(args, io.Discard, io.Discard); code != 2 {
			t.Errorf("run(%q) = %d, want 2", args, code)
		}
	}
}

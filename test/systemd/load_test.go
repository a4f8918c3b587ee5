package systemd_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// standin is a stand-in kube-apiserver process on loopback.
type standin struct {
	name string
	addr string
}

// startStandin runs `standin --listen 127.0.0.1:0 --name NAME` and waits for
// its "standin NAME listening on ADDR" line.
func startStandin(t *testing.T, bin, name string) standin {
	t.Helper()
	cmd := exec.Command(bin, "--listen", "127.0.0.1:0", "--name", name, "--log-level", "warn")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default:
			}
		}
	}()
	prefix := "standin " + name + " listening on "
	select {
	case l := <-lines:
		if !strings.HasPrefix(l, prefix) {
			t.Fatalf("standin printed %q, want %q<addr>", l, prefix)
		}
		return standin{name: name, addr: strings.TrimPrefix(l, prefix)}
	case <-time.After(60 * time.Second):
		t.Fatalf("standin %s did not report its address within 60s", name)
	}
	return standin{}
}

// freePort returns a loopback TCP port that was free a moment ago, below
// the kernel's ephemeral range (32768 and up) so that no outgoing
// connection takes it before systemd binds it.
func freePort(t *testing.T) int {
	t.Helper()
	for range 1000 {
		port := 20000 + rand.IntN(12000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			_ = l.Close()
			return port
		}
	}
	t.Fatal("no free port in 20000-31999 on 127.0.0.1")
	return 0
}

// rootInfo is what a stand-in answers on GET /.
type rootInfo struct {
	Kind string `json:"kind"`
	Name string `json:"name"`
}

// requestThrough opens a new connection to proxy, speaks TLS and HTTP/1.1
// through it, and returns the name of the stand-in that answered GET /.
// The dial error is returned unwrapped so callers can test for ECONNREFUSED.
func requestThrough(ctx context.Context, proxy string) (string, error) {
	d := net.Dialer{Timeout: 20 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", proxy)
	if err != nil {
		return "", err
	}
	return requestOn(conn, 20*time.Second)
}

// requestOn speaks TLS and HTTP/1.1 on an open connection (and closes it),
// returning the name of the stand-in that answered GET /.
func requestOn(conn net.Conn, timeout time.Duration) (string, error) {
	defer func() { _ = conn.Close() }()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	tc := tls.Client(conn, &tls.Config{InsecureSkipVerify: true, ServerName: "kubernetes"}) //nolint:gosec // stand-in's self-signed certificate
	if _, err := fmt.Fprintf(tc, "GET / HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n"); err != nil {
		return "", fmt.Errorf("after connect: write: %w", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		return "", fmt.Errorf("after connect: read response: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("after connect: read body: %w", err)
	}
	var info rootInfo
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &info) != nil || info.Kind != "Standin" {
		return "", fmt.Errorf("after connect: answer %s %q", resp.Status, body)
	}
	return info.Name, nil
}

// loadResult counts what a client loop saw.
type loadResult struct {
	Attempts int64
	OK       int64
	Refused  int64
	Other    int64
	// MaxLatency is the slowest successful request (connect to answer).
	MaxLatency time.Duration
	// Errors maps each distinct non-refused error to its count.
	Errors map[string]int
}

func (r loadResult) String() string {
	s := fmt.Sprintf("%d requests: %d ok, %d connects refused, %d other failures, slowest ok %v",
		r.Attempts, r.OK, r.Refused, r.Other, r.MaxLatency.Round(time.Millisecond))
	if len(r.Errors) > 0 {
		var keys []string
		for k := range r.Errors {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			s += fmt.Sprintf("\n  %dx %s", r.Errors[k], k)
		}
	}
	return s
}

// load is a client loop: workers that each open a new connection per
// request through the proxy, paced to about 50 requests/s each.
type load struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	ok     atomic.Int64
	mu     sync.Mutex
	res    loadResult
}

func startLoad(proxy string, workers int) *load {
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{cancel: cancel, res: loadResult{Errors: map[string]int{}}}
	for range workers {
		l.wg.Add(1)
		go l.worker(ctx, proxy)
	}
	return l
}

func (l *load) worker(ctx context.Context, proxy string) {
	defer l.wg.Done()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		start := time.Now()
		_, err := requestThrough(ctx, proxy)
		if ctx.Err() != nil {
			return // stopped mid-request: not counted
		}
		took := time.Since(start)
		l.mu.Lock()
		l.res.Attempts++
		switch {
		case err == nil:
			l.res.OK++
			l.res.MaxLatency = max(l.res.MaxLatency, took)
			l.ok.Add(1)
		case errors.Is(err, syscall.ECONNREFUSED):
			l.res.Refused++
		default:
			l.res.Other++
			l.res.Errors[err.Error()]++
		}
		l.mu.Unlock()
	}
}

// waitOK waits until n more requests than now have succeeded.
func (l *load) waitOK(n int64, d time.Duration) error {
	target := l.ok.Load() + n
	return waitFor(d, func() bool { return l.ok.Load() >= target })
}

// stop ends the loop and returns its counts.
func (l *load) stop() loadResult {
	l.cancel()
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.res
}

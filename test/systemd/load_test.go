//go:build systemdtest

package systemd_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
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

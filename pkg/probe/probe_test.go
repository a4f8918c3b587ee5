package probe

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/extractedprism/extractedprism/pkg/failure"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type result struct {
	addr string
	ok   bool
	err  error
	r    Result
}

// recorder is a Reporter that keeps every result.
type recorder struct {
	mu  sync.Mutex
	res []result
}

func (r *recorder) Report(addr string, res Result) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.res = append(r.res, result{addr, res.OK(), res.Err, res})
}

func (r *recorder) results(addr string) []result {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []result
	for _, x := range r.res {
		if x.addr == addr {
			out = append(out, x)
		}
	}
	return out
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func run(t *testing.T, o Options, targets ...string) *Prober {
	t.Helper()
	p := New(o)
	p.SetTargets(targets)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = p.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return p
}

func TestHTTPSReusesOneConnection(t *testing.T) {
	var conns atomic.Int32
	var hits atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/readyz" {
			http.NotFound(w, r)
			return
		}
		hits.Add(1)
		_, _ = w.Write([]byte("ok"))
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.StartTLS()
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "https://")
	rec := &recorder{}
	run(t, Options{Interval: 20 * time.Millisecond, Timeout: 2 * time.Second, Reporter: rec}, addr)
	waitFor(t, "10 successful probes", 20*time.Second, func() bool { return len(rec.results(addr)) >= 10 })
	for _, r := range rec.results(addr) {
		if !r.ok {
			t.Fatalf("probe failed: %v", r.err)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("%d probes used %d TCP connections, want 1 kept-alive connection", hits.Load(), n)
	}
}

func TestHTTPSUnhealthyStatus(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "etcd not ready", http.StatusInternalServerError)
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "https://")
	rec := &recorder{}
	run(t, Options{Interval: 20 * time.Millisecond, Reporter: rec}, addr)
	waitFor(t, "a probe result", 10*time.Second, func() bool { return len(rec.results(addr)) >= 1 })
	r := rec.results(addr)[0]
	if r.ok || !errors.Is(r.err, failure.ErrUnready) || !strings.Contains(r.err.Error(), "500") {
		t.Fatalf("result = %+v, want failure naming status 500", r)
	}
}

func TestHungUpstreamTimesOut(t *testing.T) {
	// Accepts TCP and never answers (a stopped apiserver).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	var mu sync.Mutex
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	defer func() {
		_ = ln.Close()
		<-acceptDone
		mu.Lock()
		for _, c := range held {
			_ = c.Close()
		}
		mu.Unlock()
	}()
	rec := &recorder{}
	start := time.Now()
	run(t, Options{Interval: 50 * time.Millisecond, Timeout: 300 * time.Millisecond, Reporter: rec}, ln.Addr().String())
	waitFor(t, "a probe result", 10*time.Second, func() bool { return len(rec.results(ln.Addr().String())) >= 1 })
	r := rec.results(ln.Addr().String())[0]
	if r.ok {
		t.Fatal("probe of a hung upstream succeeded")
	}
	if el := time.Since(start); el < 300*time.Millisecond {
		t.Fatalf("hung probe failed after %s, before its timeout", el)
	}
}

func TestTCPMode(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	up := ln.Addr().String()
	// A port with nothing listening.
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	_ = dead.Close()
	rec := &recorder{}
	run(t, Options{Mode: TCP, Interval: 20 * time.Millisecond, Reporter: rec}, up, deadAddr)
	waitFor(t, "results for both", 10*time.Second, func() bool {
		return len(rec.results(up)) >= 2 && len(rec.results(deadAddr)) >= 2
	})
	_ = ln.Close()
	<-done
	if r := rec.results(up)[0]; !r.ok {
		t.Fatalf("tcp probe of a listener failed: %v", r.err)
	}
	if r := rec.results(deadAddr)[0]; r.ok {
		t.Fatal("tcp probe of a closed port succeeded")
	}
}

func TestSetTargetsStartsAndStops(t *testing.T) {
	var hitsA, hitsB atomic.Int32
	mk := func(n *atomic.Int32) *httptest.Server {
		return httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { n.Add(1) }))
	}
	a, b := mk(&hitsA), mk(&hitsB)
	defer a.Close()
	defer b.Close()
	aa, ba := strings.TrimPrefix(a.URL, "https://"), strings.TrimPrefix(b.URL, "https://")
	rec := &recorder{}
	p := run(t, Options{Interval: 10 * time.Millisecond, Reporter: rec}, aa)
	waitFor(t, "a probed", 10*time.Second, func() bool { return hitsA.Load() >= 2 })
	p.SetTargets([]string{ba})
	waitFor(t, "b probed", 10*time.Second, func() bool { return hitsB.Load() >= 2 })
	// After a's loop stopped, at most one probe in flight may still land.
	stopped := hitsA.Load()
	waitFor(t, "b probed more", 10*time.Second, func() bool { return hitsB.Load() >= 10 })
	if extra := hitsA.Load() - stopped; extra > 1 {
		t.Fatalf("removed target still probed %d more times", extra)
	}
}

func TestJitterStaysInBounds(t *testing.T) {
	p := New(Options{Interval: time.Second, Jitter: 0.2})
	for range 1000 {
		d := p.next()
		if d < 800*time.Millisecond || d > 1200*time.Millisecond {
			t.Fatalf("jittered interval %s outside [0.8s, 1.2s]", d)
		}
	}
}

package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// The health decisions of a balancer that runs on every node: what the
// proxy reports, moves and closes must never turn a client's behaviour or
// a slow cluster into upstreams marked down.

// handshakeTimeoutBackend is an HTTPS server that, like kube-apiserver,
// closes connections that send nothing within its handshake timeout
// (net/http applies ReadHeaderTimeout to the TLS handshake). It returns
// the address and a count of accepted connections.
func handshakeTimeoutBackend(t *testing.T, timeout time.Duration) (string, *atomic.Int32) {
	t.Helper()
	var accepted atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok"))
	}))
	srv.Config.ReadHeaderTimeout = timeout
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			accepted.Add(1)
		}
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "https://"), &accepted
}

func TestSilentClientsMarkNothing(t *testing.T) {
	a, acceptedA := handshakeTimeoutBackend(t, 300*time.Millisecond)
	b, acceptedB := handshakeTimeoutBackend(t, 300*time.Millisecond)
	var failed atomic.Int32
	h := startProxy(t, Options{Replay: true, FirstByteTimeout: 5 * time.Second, Observer: countDialFailed{n: &failed}},
		[]string{a, b}, a, b)
	const clients = 6
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for range clients {
		c := h.dial(t)
		wg.Go(func() {
			defer func() { _ = c.Close() }()
			_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
			n, err := c.Read(make([]byte, 1))
			if n != 0 || err == nil {
				errs <- errors.New("a silent client got bytes")
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				errs <- errors.New("a silent client was never closed: its upstream's close was not passed on")
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for _, st := range h.set.Snapshot() {
		if st.State != upstream.Up || st.Suspect || st.Failures != 0 {
			t.Errorf("%s = %+v after silent clients; want up, not suspect, no failures", st.Address, st)
		}
	}
	if n := acceptedA.Load() + acceptedB.Load(); n != clients || failed.Load() != 0 {
		t.Fatalf("upstreams accepted %d connections for %d silent clients, %d failures counted; want no re-dial, no failure", n, clients, failed.Load())
	}
}

// delayed answers like target, but only after d: an overloaded apiserver.
func delayed(target string, d time.Duration) func(net.Conn) {
	return func(c net.Conn) {
		defer func() { _ = c.Close() }()
		time.Sleep(d) // the upstream's own slowness, not synchronisation
		up, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		defer func() { _ = up.Close() }()
		go func() { _, _ = io.Copy(up, c); _ = up.Close() }()
		_, _ = io.Copy(c, up)
	}
}

func TestAllSlowUpstreamsKeepTheClientWaiting(t *testing.T) {
	_, tlsAddr := tlsBackend(t)
	slow1 := startBackend(t, "tcp", "127.0.0.1:0", delayed(tlsAddr, 1500*time.Millisecond))
	slow2 := startBackend(t, "tcp", "127.0.0.1:0", delayed(tlsAddr, 1500*time.Millisecond))
	h := startProxy(t, Options{Replay: true, FirstByteTimeout: 300 * time.Millisecond},
		[]string{slow1.addr(), slow2.addr()}, slow1.addr(), slow2.addr())
	body, err := getThrough(t, h.ln.Addr().String())
	if err != nil || body != "from-tls-backend" {
		t.Fatalf("GET through proxy = %q, %v; want the slow answer, not an error", body, err)
	}
	for _, st := range h.set.Snapshot() {
		if st.State != upstream.Up {
			t.Errorf("%s = %+v; a slow upstream is not down", st.Address, st)
		}
	}
}

func TestCloseUpstreamSpreadsItsCloses(t *testing.T) {
	a := startBackend(t, "tcp", "127.0.0.1:0", echo)
	b := startBackend(t, "tcp", "127.0.0.1:0", echo)
	h := startProxy(t, Options{}, []string{a.addr(), b.addr()}, a.addr())
	const n = 20
	var mu sync.Mutex
	var closedAt []time.Time
	var wg sync.WaitGroup
	for _, c := range h.dialEchoed(t, n) {
		wg.Go(func() {
			defer func() { _ = c.Close() }()
			_, _ = c.Read(make([]byte, 1))
			mu.Lock()
			closedAt = append(closedAt, time.Now())
			mu.Unlock()
		})
	}
	h.set.Report(b.addr(), true, 0, nil)
	ua := h.set.Lookup(a.addr())
	const spread = time.Second
	start := time.Now()
	closed, complete := h.srv.CloseUpstream(context.Background(), ua, spread, func() bool { return true })
	if closed != n || !complete {
		t.Fatalf("closed %d (complete %v), want %d", closed, complete, n)
	}
	wg.Wait()
	slices.SortFunc(closedAt, func(x, y time.Time) int { return x.Compare(y) })
	span := closedAt[n-1].Sub(closedAt[0])
	t.Logf("%d closes over %s (window %s), first after %s", n, span, spread, closedAt[0].Sub(start))
	if span < spread/4 {
		t.Fatalf("%d closes within %s: not spread over the %s window", n, span, spread)
	}
	if last := closedAt[n-1].Sub(start); last > spread+3*time.Second {
		t.Fatalf("last close after %s, want within the %s window", last, spread)
	}
}

func TestCloseUpstreamStopsWhenNotStill(t *testing.T) {
	a := startBackend(t, "tcp", "127.0.0.1:0", echo)
	h := startProxy(t, Options{}, []string{a.addr()}, a.addr())
	conns := h.dialEchoed(t, 10)
	var asked atomic.Int32
	closed, complete := h.srv.CloseUpstream(context.Background(), h.set.Lookup(a.addr()), 0,
		func() bool { return asked.Add(1) <= 4 }) // the first ask is before any close
	if closed != 3 || complete {
		t.Fatalf("closed %d (complete %v); want 3 and a stop when still() says no", closed, complete)
	}
	alive := 0
	for _, c := range conns {
		_, _ = c.Write([]byte("q"))
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 1)); err == nil {
			alive++
		}
	}
	if alive != 7 {
		t.Fatalf("%d connections still work, want 7", alive)
	}
}

func TestCloseUpstreamMovesAWaitingSilentClient(t *testing.T) {
	a := startBackend(t, "tcp", "127.0.0.1:0", echo)
	b := startBackend(t, "tcp", "127.0.0.1:0", echo)
	h := startProxy(t, Options{Replay: true}, []string{a.addr(), b.addr()}, a.addr())
	c := h.dial(t)
	defer func() { _ = c.Close() }()
	ua := h.set.Lookup(a.addr())
	waitFor(t, "the silent client on a", 10*time.Second, func() bool { return a.accepted.Load() == 1 })
	h.set.Report(b.addr(), true, 0, nil)
	if closed, _ := h.srv.CloseUpstream(context.Background(), ua, 0, func() bool { return true }); closed != 0 {
		t.Fatalf("closed %d client connections; a connection waiting for its first byte is moved, not closed", closed)
	}
	waitFor(t, "the client moved to b", 10*time.Second, func() bool { return b.accepted.Load() == 1 })
	_, _ = c.Write([]byte("m"))
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("moved client: %v", err)
	}
	if st := h.set.Snapshot()[indexOf(h.set, ua)]; st.Failures != 0 || st.Suspect {
		t.Fatalf("moving a client counted as a failure of a: %+v", st)
	}
}

// slowDial dials after d, like a connect across a loaded network.
func slowDial(d time.Duration) DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
		}
		var nd net.Dialer
		return nd.DialContext(ctx, network, addr)
	}
}

func TestBurstOfConnectsSpreadsAfterARecovery(t *testing.T) {
	backs := []*backend{
		startBackend(t, "tcp", "127.0.0.1:0", echo),
		startBackend(t, "tcp", "127.0.0.1:0", echo),
		startBackend(t, "tcp", "127.0.0.1:0", echo),
	}
	addrs := []string{backs[0].addr(), backs[1].addr(), backs[2].addr()}
	h := startProxy(t, Options{Dial: slowDial(50 * time.Millisecond)}, addrs, addrs[1], addrs[2])
	h.set.SetThresholds(2, 2, upstream.LeastConnections)
	hold := func(k int) {
		var wg sync.WaitGroup
		for range k {
			c := h.dial(t)
			t.Cleanup(func() { _ = c.Close() })
			wg.Go(func() {
				_, _ = c.Write([]byte("h"))
				_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
				_, _ = io.ReadFull(c, make([]byte, 1))
			})
		}
		wg.Wait()
	}
	hold(40) // 20 each on the two that are up
	h.set.Report(addrs[0], true, 0, nil)
	hold(64) // a burst right after the recovery of the first
	us := h.set.Upstreams()
	total := int64(0)
	for _, u := range us {
		total += u.Active()
	}
	if total != 104 {
		t.Fatalf("%d connections, want 104", total)
	}
	mean := float64(total) / 3
	for _, u := range us {
		if d := float64(u.Active()) - mean; d > mean/4 || d < -mean/4 {
			t.Errorf("%s carries %d, want within 25%% of %.1f", u.Addr(), u.Active(), mean)
		}
	}
}

func TestShutdownUnderConnectStormEndsInTime(t *testing.T) {
	b := startBackend(t, "tcp", "127.0.0.1:0", echo)
	var worst time.Duration
	defer func() { t.Logf("50 shutdowns under a connect storm: the slowest took %s", worst) }()
	for run := range 50 {
		// Cut at once, or after a short drain: connections accepted just
		// before the listener closed must be cut either way.
		drain := time.Duration(-1)
		if run%2 == 1 {
			drain = 20 * time.Millisecond
		}
		h := startProxy(t, Options{DrainTimeout: drain}, []string{b.addr()}, b.addr())
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		var mu sync.Mutex
		var held []net.Conn
		for range 4 {
			wg.Go(func() {
				for ctx.Err() == nil {
					c, err := net.DialTimeout("tcp", h.ln.Addr().String(), time.Second)
					if err != nil {
						continue // refused once the listener is closed
					}
					_, _ = c.Write([]byte("s")) // a stream that never ends on its own
					mu.Lock()
					held = append(held, c)
					mu.Unlock()
				}
			})
		}
		waitFor(t, "streams open", 10*time.Second, func() bool { return h.srv.Active() >= 20 })
		start := time.Now()
		stopped := make(chan struct{})
		go func() { h.stop(); close(stopped) }()
		// A server that waits on a connection it did not cut never ends;
		// the bound leaves room for a loaded machine.
		limit := max(drain, 0) + 3*time.Second
		var late bool
		select {
		case <-stopped:
		case <-time.After(limit):
			late = true
		}
		cancel()
		wg.Wait()
		for _, c := range held { // ends the streams a late shutdown waits on
			_ = c.Close()
		}
		<-stopped
		worst = max(worst, time.Since(start))
		if late {
			t.Fatalf("run %d: shutdown still waiting after %s (drain_timeout %s): it waits on a connection it did not cut",
				run, time.Since(start).Round(time.Millisecond), drain)
		}
	}
}

type countDialFailed struct {
	nop
	n *atomic.Int32
}

func (c countDialFailed) DialFailed(*upstream.Upstream, failure.Kind) { c.n.Add(1) }

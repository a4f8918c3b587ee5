package proxy

import (
	"errors"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

type countRefused struct {
	nop
	n *atomic.Int32
}

func (c countRefused) Refused(reason string) {
	if reason == RefusedMaxConnections {
		c.n.Add(1)
	}
}

// refusedAtOnce dials the proxy and checks that the connection is ended
// by the proxy without waiting: a reset (on loopback it may already fail
// the connect) or EOF, well before the read deadline.
func refusedAtOnce(t *testing.T, h *harness) {
	t.Helper()
	start := time.Now()
	c, err := net.DialTimeout("tcp", h.ln.Addr().String(), 5*time.Second)
	if err != nil {
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("dial proxy: %v, want success or a reset", err)
		}
		return
	}
	defer func() { _ = c.Close() }()
	_, _ = c.Write([]byte("p"))
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	switch {
	case err == nil:
		t.Fatal("the connection beyond max_connections was proxied")
	case errors.As(err, &ne) && ne.Timeout():
		t.Fatal("the connection beyond max_connections was left hanging")
	case !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET):
		t.Fatalf("read: %v, want EOF or a reset", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("refused after %s", d)
	}
}

func TestMaxConnectionsRefusesBeyondTheCap(t *testing.T) {
	b := startBackend(t, "tcp", "127.0.0.1:0", echo)
	var refused atomic.Int32
	const limit = 3
	h := startProxy(t, Options{MaxConnections: limit, Observer: countRefused{n: &refused}}, []string{b.addr()}, b.addr())

	conns := h.dialEchoed(t, limit) // each proven by a round trip
	waitFor(t, "the connections tracked", 10*time.Second, func() bool { return h.srv.Active() == limit })

	refusedAtOnce(t, h)
	waitFor(t, "the refusal counted", 10*time.Second, func() bool { return refused.Load() == 1 })
	if h.srv.Refused() != 1 || h.srv.Active() != limit {
		t.Fatalf("refused %d, active %d; want 1 and %d", h.srv.Refused(), h.srv.Active(), limit)
	}
	// The established connections still work.
	for _, c := range conns {
		roundTrip(t, c, 'q')
	}

	// One ends: a new connection is proxied again.
	_ = conns[0].Close()
	waitFor(t, "the closed connection untracked", 10*time.Second, func() bool { return h.srv.Active() == limit-1 })
	h.dialEchoed(t, 1)
	if n := refused.Load(); n != 1 {
		t.Fatalf("refused %d connections, want 1", n)
	}
}

func TestMaxConnectionsLoweredCutsNothing(t *testing.T) {
	b := startBackend(t, "tcp", "127.0.0.1:0", echo)
	var refused atomic.Int32
	o := Options{MaxConnections: 4, Observer: countRefused{n: &refused}}
	h := startProxy(t, o, []string{b.addr()}, b.addr())
	conns := h.dialEchoed(t, 4)

	o.MaxConnections = 2
	h.srv.SetOptions(o)
	if h.srv.MaxConnections() != 2 {
		t.Fatalf("MaxConnections = %d after SetOptions", h.srv.MaxConnections())
	}
	for _, c := range conns {
		roundTrip(t, c, 'q') // none was cut
	}
	refusedAtOnce(t, h)

	// Only once below the new cap is a connection proxied again.
	_ = conns[0].Close()
	_ = conns[1].Close()
	_ = conns[2].Close()
	waitFor(t, "connections untracked", 10*time.Second, func() bool { return h.srv.Active() == 1 })
	h.dialEchoed(t, 1)
	waitFor(t, "one refusal counted", 10*time.Second, func() bool { return refused.Load() == 1 })

	// 0 lifts the cap.
	o.MaxConnections = 0
	h.srv.SetOptions(o)
	h.dialEchoed(t, 3)
	if n := refused.Load(); n != 1 {
		t.Fatalf("refused %d connections, want 1", n)
	}
}

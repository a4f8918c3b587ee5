//go:build linux

package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/extractedprism/extractedprism/pkg/proxy/internal/sys"
	"github.com/extractedprism/extractedprism/pkg/proxy/relay"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// gauge keeps the per-upstream active_connections gauge the way the
// metrics package does: +1 on ConnOpened, -1 on ConnClosed.
type gauge struct {
	nop
	mu     sync.Mutex
	active map[string]int
	closed atomic.Int32 // ClosedOnDown
}

func newGauge() *gauge { return &gauge{active: map[string]int{}} }

func (g *gauge) ConnOpened(u *upstream.Upstream) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.active[u.Addr()]++
}

func (g *gauge) ConnClosed(u *upstream.Upstream, _, _ int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.active[u.Addr()]--
}

func (g *gauge) ClosedOnDown(n int) { g.closed.Add(int32(n)) } //nolint:gosec // small counts

func (g *gauge) get(a string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.active[a]
}

// expectClosed reads from c until the proxy closes it; a read that times
// out means the client was left hanging.
func expectClosed(t *testing.T, c net.Conn, what string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: the client was left hanging (%v), want its connection closed", what, err)
	}
}

// roundTrip writes one byte and expects it echoed.
func roundTrip(t *testing.T, c net.Conn, b byte) {
	t.Helper()
	if _, err := c.Write([]byte{b}); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, 1)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || got[0] != b {
		t.Fatalf("round trip: read %q, %v; want %q", got, err, b)
	}
	_ = c.SetReadDeadline(time.Time{})
}

// TestActiveGaugeStaysPairedOnConnectTimeouts: connects that time out with
// nowhere else to go never opened a connection, so they close none.
func TestActiveGaugeStaysPairedOnConnectTimeouts(t *testing.T) {
	hung := fullListener(t)
	g := newGauge()
	h := startProxy(t, Options{DialTimeout: 200 * time.Millisecond, Observer: g}, []string{hung}, hung)
	for range 5 {
		c := h.dial(t)
		expectClosed(t, c, "connect timeout")
		_ = c.Close()
	}
	waitFor(t, "no connection left", 20*time.Second, func() bool { return h.srv.Active() == 0 })
	if n := g.get(hung); n != 0 {
		t.Fatalf("active_connections of the upstream = %d after 5 timed-out connects, want 0", n)
	}
}

// TestActiveGaugeStaysPairedOnCloseWhileConnecting: connections closed
// (close_on_down) while their connect is under way leave the gauge at 0.
func TestActiveGaugeStaysPairedOnCloseWhileConnecting(t *testing.T) {
	hung := fullListener(t)
	g := newGauge()
	h := startProxy(t, Options{DialTimeout: 10 * time.Second, Observer: g}, []string{hung}, hung)
	var cs []net.Conn
	for range 5 {
		cs = append(cs, h.dial(t))
	}
	u := h.set.Lookup(hung)
	waitFor(t, "5 connections connecting", 10*time.Second, func() bool { return len(h.srv.connsOn(u)) == 5 })
	h.srv.CloseUpstream(context.Background(), u, 0, func() bool { return true })
	for _, c := range cs {
		expectClosed(t, c, "closed while connecting")
		_ = c.Close()
	}
	waitFor(t, "no connection left", 20*time.Second, func() bool { return h.srv.Active() == 0 })
	if n := g.get(hung); n != 0 {
		t.Fatalf("active_connections of the upstream = %d after 5 connections closed while connecting, want 0", n)
	}
}

// TestMoveMeantForTheOldUpstreamSparesTheNewOne: close_on_down of an
// upstream whose connection is meanwhile being replayed to another one
// applies to the old upstream only; the client gets its answer from the
// healthy one.
func TestMoveMeantForTheOldUpstreamSparesTheNewOne(t *testing.T) {
	bad := startBackend(t, "tcp", "127.0.0.1:0", resetOnData)
	_, good := tlsBackend(t)
	var once sync.Once
	inDial := make(chan struct{})
	release := make(chan struct{})
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		if addr == good {
			once.Do(func() { close(inDial); <-release })
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	h := startProxy(t, Options{Replay: true, Dial: dial, FirstByteTimeout: 5 * time.Second},
		[]string{bad.addr(), good}, bad.addr())
	res := make(chan string, 1)
	go func() {
		body, err := getThrough(t, h.ln.Addr().String())
		if err != nil {
			body = "error: " + err.Error()
		}
		res <- body
	}()
	<-inDial // the connection is out for a replay from bad to good
	h.srv.CloseUpstream(context.Background(), h.set.Lookup(bad.addr()), 0, func() bool { return true })
	close(release)
	if r := <-res; r != "from-tls-backend" {
		t.Fatalf("client got %q, want the healthy upstream's answer", r)
	}
}

// TestRelayStartFailureClosesTheClient: when the data path cannot start,
// the client is closed at once and untracked, and the next connection
// tries again.
func TestRelayStartFailureClosesTheClient(t *testing.T) {
	be := startBackend(t, "tcp", "127.0.0.1:0", echo)
	var calls atomic.Int32
	setup := func(s *Server) {
		s.newRelay = func() (*relay.Relay, error) {
			if calls.Add(1) == 1 {
				return nil, unix.EMFILE
			}
			return relay.New(relay.Config{})
		}
	}
	h := startProxyWith(t, Options{}, setup, []string{be.addr()}, be.addr())
	c := h.dial(t)
	defer func() { _ = c.Close() }()
	expectClosed(t, c, "data path failed to start")
	waitFor(t, "the failed connection untracked", 10*time.Second, func() bool { return h.srv.Active() == 0 })
	c2 := h.dial(t)
	defer func() { _ = c2.Close() }()
	roundTrip(t, c2, 'x')
}

// TestUnwrittenBytesAreNeverReplayedAsNothing: a client's bytes that are
// not a TLS handshake, read but not written because the upstream had
// already reset, are not lost on the way to another upstream: the client
// is closed, as it would be without a balancer.
func TestUnwrittenBytesAreNeverReplayedAsNothing(t *testing.T) {
	connected, reset := make(chan struct{}), make(chan struct{})
	var once sync.Once
	bad := startBackend(t, "tcp", "127.0.0.1:0", func(c net.Conn) {
		<-connected // a reset before the dial returned would fail the dial
		_ = c.(*net.TCPConn).SetLinger(0)
		_ = c.Close() // RST
		once.Do(func() { close(reset) })
	})
	good := startBackend(t, "tcp", "127.0.0.1:0", echo)
	wrote := make(chan struct{})
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err == nil && addr == bad.addr() {
			close(connected)
			<-reset // the reset is queued on the upstream socket
			<-wrote // and the client's bytes wait on the client's
		}
		return c, err
	}
	g := newGauge()
	h := startProxy(t, Options{Replay: true, Dial: dial, FirstByteTimeout: 5 * time.Second, Observer: g},
		[]string{bad.addr(), good.addr()}, bad.addr())
	c := h.dial(t)
	defer func() { _ = c.Close() }()
	if _, err := c.Write([]byte("GET /healthz HTTP/1.0\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	close(wrote)
	expectClosed(t, c, "unreplayable bytes")
	if n := good.accepted.Load(); n != 0 {
		t.Fatalf("the healthy upstream was dialled %d times with none of the client's bytes, want never", n)
	}
	waitFor(t, "no connection left", 10*time.Second, func() bool { return h.srv.Active() == 0 })
	if n := g.get(bad.addr()); n != 0 {
		t.Fatalf("active_connections of the reset upstream = %d, want 0", n)
	}
}

// TestMoveOfAnUnreplayableConnectionClosesIt: close_on_down of a
// connection waiting for its upstream's first byte, whose client bytes
// cannot be replayed, closes the client instead of moving it to another
// upstream with nothing.
func TestMoveOfAnUnreplayableConnectionClosesIt(t *testing.T) {
	req := []byte("GET /healthz HTTP/1.0\r\n\r\n")
	got := make(chan struct{})
	hung := startBackend(t, "tcp", "127.0.0.1:0", func(c net.Conn) {
		if _, err := io.ReadFull(c, make([]byte, len(req))); err == nil {
			close(got)
		}
		hang(c)
	})
	good := startBackend(t, "tcp", "127.0.0.1:0", echo)
	g := newGauge()
	h := startProxy(t, Options{Replay: true, Observer: g}, []string{hung.addr(), good.addr()}, hung.addr())
	c := h.dial(t)
	defer func() { _ = c.Close() }()
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	<-got
	h.set.Report(good.addr(), true, 0, nil)
	h.set.Report(good.addr(), true, 0, nil)
	h.srv.CloseUpstream(context.Background(), h.set.Lookup(hung.addr()), 0, func() bool { return true })
	expectClosed(t, c, "moved with unreplayable bytes")
	if n := good.accepted.Load(); n != 0 {
		t.Fatalf("the connection was moved to the healthy upstream (%d accepts) with none of its bytes, want closed", n)
	}
	waitFor(t, "the close counted", 10*time.Second, func() bool { return g.closed.Load() == 1 })
}

// TestDeadEventLoopIsAvoidedAndReported: when an event loop fails, its
// connections end, new connections go to the loops still running, the
// proxy reports itself not alive with the reason, and shutdown completes.
func TestDeadEventLoopIsAvoidedAndReported(t *testing.T) {
	be := startBackend(t, "tcp", "127.0.0.1:0", echo)
	var failing atomic.Bool
	wait := func(loop, epfd int, events []unix.EpollEvent) (int, error) {
		if loop == 0 && failing.Load() {
			return 0, unix.EBADF
		}
		return sys.EpollWait(epfd, events)
	}
	setup := func(s *Server) {
		s.newRelay = func() (*relay.Relay, error) { return relay.New(relay.Config{Loops: 2, Wait: wait}) }
	}
	h := startProxyWith(t, Options{}, setup, []string{be.addr()}, be.addr())
	c := h.dialEchoed(t, 1)[0] // the first loop carries it
	failing.Store(true)
	_, _ = c.Write([]byte("w")) // its loop wakes, and fails
	expectClosed(t, c, "connection of a failed event loop")
	for i := range 4 {
		c := h.dial(t)
		roundTrip(t, c, 'a'+byte(i))
		_ = c.Close()
	}
	waitFor(t, "the proxy to report the failed loop", 10*time.Second, func() bool { return !h.srv.Alive() })
	if err := h.srv.LivenessError(); err == nil || !strings.Contains(err.Error(), "event loop") {
		t.Fatalf("liveness error = %v, want one naming the failed event loop", err)
	}
	stopped := make(chan struct{})
	go func() { h.stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(20 * time.Second):
		t.Fatal("shutdown did not complete after an event loop failed")
	}
}

// TestReplayedConnectionIsPlainAfterItsFirstByte: once the upstream a
// handshake was replayed to has answered, the connection is plain
// forwarding: its first-byte deadline is over, and the answering upstream
// is never reported for it.
func TestReplayedConnectionIsPlainAfterItsFirstByte(t *testing.T) {
	bad := startBackend(t, "tcp", "127.0.0.1:0", resetOnData)
	good := startBackend(t, "tcp", "127.0.0.1:0", echo)
	const fbt = 200 * time.Millisecond
	var replays atomic.Int32
	h := startProxy(t, Options{Replay: true, FirstByteTimeout: fbt, Observer: countReplays{n: &replays}},
		[]string{bad.addr(), good.addr()}, bad.addr(), good.addr())
	// Round robin: connections alternate; one of the first two starts on bad.
	for i := range 2 {
		c := h.dial(t)
		defer func() { _ = c.Close() }()
		hello := []byte{22, 3, 1, 0, 1, byte(i)}
		if _, err := c.Write(hello); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, c, len(hello)); got != string(hello) {
			t.Fatalf("connection %d: echo %q", i, got)
		}
		deadline := time.NewTimer(5 * fbt)
		<-deadline.C // well past the first-byte deadline
		roundTrip(t, c, 'k')
	}
	if replays.Load() != 1 {
		t.Fatalf("%d replays, want 1", replays.Load())
	}
	if st := h.set.Snapshot()[indexOf(h.set, h.set.Lookup(good.addr()))]; st.Failures != 0 || st.Suspect {
		t.Fatalf("the answering upstream was reported: %+v", st)
	}
}

func readN(t *testing.T, c net.Conn, n int) string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read: %v", err)
	}
	_ = c.SetReadDeadline(time.Time{})
	return string(b)
}

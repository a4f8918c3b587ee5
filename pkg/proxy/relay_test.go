package proxy

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// TestEstablishedConnectionsCostNoGoroutine: once established, a
// connection is carried by the relay's event loops, not by goroutines of
// its own, with and without replay; and every one of them still works.
func TestEstablishedConnectionsCostNoGoroutine(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the event loops are Linux only")
	}
	for _, replay := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "replay"}[replay], func(t *testing.T) {
			b := startBackend(t, "tcp", "127.0.0.1:0", echo)
			h := startProxy(t, Options{Replay: replay}, []string{b.addr()}, b.addr())
			h.dialEchoed(t, 1) // starts the relay
			base := runtime.NumGoroutine()
			const n = 200
			conns := h.dialEchoed(t, n)
			// Each connection costs one goroutine in the in-process backend
			// (echo); the proxy may use a few while handshakes finish.
			limit := base + n + 10
			waitFor(t, "handshake goroutines to end", 20*time.Second, func() bool { return runtime.NumGoroutine() <= limit })
			for i, c := range conns {
				msg := []byte{byte(i), byte(i >> 8), 'x'}
				if _, err := c.Write(msg); err != nil {
					t.Fatalf("write on connection %d: %v", i, err)
				}
				got := make([]byte, len(msg))
				_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("connection %d echoed %q, %v; want %q", i, got, err, msg)
				}
			}
		})
	}
}

type countBytes struct {
	nop
	mu             sync.Mutex
	sent, received int64
	closed         int
}

func (c *countBytes) ConnClosed(_ *upstream.Upstream, sent, received int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sent += sent
	c.received += received
	c.closed++
}

func (c *countBytes) get() (sent, received int64, closed int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sent, c.received, c.closed
}

// TestSlowReaderGetsEveryByte: an upstream that sends far more than the
// client reads at once (a big list answer to a slow client) is pushed back
// rather than buffered without bound, and the client gets every byte in
// order; the bytes are reported once the connection ends.
func TestSlowReaderGetsEveryByte(t *testing.T) {
	payload := make([]byte, 48<<20)
	_, _ = rand.Read(payload)
	b := startBackend(t, "tcp", "127.0.0.1:0", func(c net.Conn) {
		defer func() { _ = c.Close() }()
		req := make([]byte, 3)
		if _, err := io.ReadFull(c, req); err != nil {
			return
		}
		_, _ = c.Write(payload)
	})
	obs := &countBytes{}
	h := startProxy(t, Options{Replay: true, Observer: obs}, []string{b.addr()}, b.addr())
	c := h.dial(t)
	defer func() { _ = c.Close() }()
	if _, err := c.Write([]byte("GET")); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(60 * time.Second))
	got := make([]byte, 0, len(payload))
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf) // small reads: the proxy's writes block often
		got = append(got, buf[:n]...)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("read after %d bytes: %v", len(got), err)
		}
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("received %d bytes that differ from the %d sent", len(got), len(payload))
	}
	_ = c.Close()
	waitFor(t, "the connection to be reported closed", 20*time.Second, func() bool { _, _, n := obs.get(); return n == 1 })
	if sent, received, _ := obs.get(); sent != 3 || received != int64(len(payload)) {
		t.Fatalf("reported sent %d, received %d; want 3 and %d", sent, received, len(payload))
	}
}

// TestClientResetEndsBothLegs: a client that resets its connection ends
// the upstream leg too, and its place in least-connections is given back.
func TestClientResetEndsBothLegs(t *testing.T) {
	var upEnded atomic.Int32
	b := startBackend(t, "tcp", "127.0.0.1:0", func(c net.Conn) {
		defer func() { _ = c.Close() }()
		_, _ = io.Copy(c, c)
		upEnded.Add(1)
	})
	h := startProxy(t, Options{Replay: true}, []string{b.addr()}, b.addr())
	u := h.set.Lookup(b.addr())
	conns := h.dialEchoed(t, 3)
	waitFor(t, "3 connections", 10*time.Second, func() bool { return u.Active() == 3 })
	_ = conns[0].SetLinger(0)
	_ = conns[0].Close()
	waitFor(t, "the upstream leg of the reset connection to end", 20*time.Second, func() bool { return upEnded.Load() == 1 })
	waitFor(t, "2 connections", 20*time.Second, func() bool { return u.Active() == 2 && h.srv.Active() == 2 })
}

// TestUpstreamHalfCloseReachesTheClient: an upstream that answers and
// half-closes (a response with Connection: close, written before the
// request body ends) passes its FIN on while the client goes on sending.
func TestUpstreamHalfCloseReachesTheClient(t *testing.T) {
	got := make(chan []byte, 1)
	b := startBackend(t, "tcp", "127.0.0.1:0", func(c net.Conn) {
		defer func() { _ = c.Close() }()
		if _, err := c.Write([]byte("bye")); err != nil {
			return
		}
		_ = c.(*net.TCPConn).CloseWrite()
		data, _ := io.ReadAll(c)
		got <- data
	})
	h := startProxy(t, Options{Replay: true}, []string{b.addr()}, b.addr())
	c := h.dial(t)
	defer func() { _ = c.Close() }()
	if _, err := c.Write([]byte{22, 3, 1, 0, 1, 1}); err != nil { // a TLS handshake record
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	answer, err := io.ReadAll(c)
	if err != nil || string(answer) != "bye" {
		t.Fatalf("read %q, %v; want \"bye\" then EOF", answer, err)
	}
	if _, err := c.Write([]byte("more")); err != nil {
		t.Fatalf("write after the upstream's half-close: %v", err)
	}
	_ = c.CloseWrite()
	select {
	case data := <-got:
		if want := string([]byte{22, 3, 1, 0, 1, 1}) + "more"; string(data) != want {
			t.Fatalf("upstream got %q, want %q", data, want)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the upstream never saw the client's FIN")
	}
}

// fullListener is a listening socket whose accept queue is full and never
// drained: the kernel drops further SYNs, so a connect to it neither
// succeeds nor fails (an apiserver host that stopped answering).
func fullListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	rc, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	_ = rc.Control(func(fd uintptr) { _ = syscall.Listen(int(fd), 0) })
	t.Cleanup(func() { _ = ln.Close() })
	// Fill the queue (backlog 0 holds one) with connects nobody accepts.
	for range 2 {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			t.Cleanup(func() { _ = c.Close() })
		}
	}
	return addr
}

type countDialKinds struct {
	nop
	mu    sync.Mutex
	kinds map[failure.Kind]int
}

func (c *countDialKinds) DialFailed(_ *upstream.Upstream, k failure.Kind) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.kinds[k]++
}

// TestConnectTimeoutFailsOver: a connect that hangs is given up after
// DialTimeout, reported as a timeout, and the client is served by the next
// upstream within the same connection.
func TestConnectTimeoutFailsOver(t *testing.T) {
	hung := fullListener(t)
	good := startBackend(t, "tcp", "127.0.0.1:0", echo)
	obs := &countDialKinds{kinds: map[failure.Kind]int{}}
	h := startProxy(t, Options{DialTimeout: 300 * time.Millisecond, Observer: obs}, []string{hung, good.addr()}, hung, good.addr())
	for i := range 4 { // round robin: at least two start on the hung upstream
		c := h.dial(t)
		msg := []byte{'a' + byte(i)}
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 1)
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		if _, err := io.ReadFull(c, got); err != nil || got[0] != msg[0] {
			t.Fatalf("connection %d: read %q, %v", i, got, err)
		}
		_ = c.Close()
	}
	waitFor(t, "no connection left", 20*time.Second, func() bool { return h.srv.Active() == 0 })
	for _, a := range []string{hung, good.addr()} {
		if n := h.set.Lookup(a).Active(); n != 0 {
			t.Fatalf("upstream %s holds %d places after every connection ended, want 0", a, n)
		}
	}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if obs.kinds[failure.Timeout] == 0 {
		t.Fatalf("no connect timeout reported (dial failures by kind: %v)", obs.kinds)
	}
}

// TestConnectTimeoutWithNowhereElse: when the only upstream's connect
// hangs, the client is closed after DialTimeout, and the upstream's place
// in least-connections is given back exactly once.
func TestConnectTimeoutWithNowhereElse(t *testing.T) {
	hung := fullListener(t)
	h := startProxy(t, Options{DialTimeout: 200 * time.Millisecond}, []string{hung}, hung)
	u := h.set.Lookup(hung)
	for range 3 {
		c := h.dial(t)
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		if n, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatalf("read %d bytes from a connection whose only upstream never connects", n)
		}
		_ = c.Close()
	}
	waitFor(t, "no connection left on the upstream", 20*time.Second, func() bool { return h.srv.Active() == 0 })
	if n := u.Active(); n != 0 {
		t.Fatalf("upstream holds %d places after every connection ended, want 0", n)
	}
}

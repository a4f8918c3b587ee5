package proxy

import (
	"io"
	"net"
	"testing"
	"time"
)

// benchProxy is a proxy in front of one echoing upstream on loopback.
func benchProxy(b *testing.B) *harness {
	b.Helper()
	be := startBackend(b, "tcp", "127.0.0.1:0", echo)
	return startProxy(b, Options{Replay: true}, []string{be.addr()}, be.addr())
}

// BenchmarkRelayRoundTrip measures one small request and its echo through
// the proxy on an established connection.
func BenchmarkRelayRoundTrip(b *testing.B) {
	h := benchProxy(b)
	c, err := net.DialTimeout("tcp", h.ln.Addr().String(), 5*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	msg := make([]byte, 64)
	msg[0] = 22 // a TLS handshake record type, so the replay phase keeps it
	got := make([]byte, len(msg))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRelayBulk measures throughput of a stream echoed through the
// proxy, 64 KiB at a time.
func BenchmarkRelayBulk(b *testing.B) {
	h := benchProxy(b)
	c, err := net.DialTimeout("tcp", h.ln.Addr().String(), 5*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	msg := make([]byte, 64<<10)
	done := make(chan error, 1)
	go func() {
		_, err := io.CopyN(io.Discard, c, int64(b.N)*int64(len(msg)))
		done <- err
	}()
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

// BenchmarkRelayConnect measures a connection's whole life through the
// proxy: connect, one round trip, close.
func BenchmarkRelayConnect(b *testing.B) {
	h := benchProxy(b)
	msg := []byte{22, 3, 1, 0, 1, 0}
	got := make([]byte, len(msg))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		c, err := net.DialTimeout("tcp", h.ln.Addr().String(), 5*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			b.Fatal(err)
		}
		_ = c.Close()
	}
	b.StopTimer()
	waitFor(b, "no connection left", 20*time.Second, func() bool { return h.srv.Active() == 0 })
}

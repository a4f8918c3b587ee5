//go:build linux

package relay

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tcpPair returns a loopback TCP connection: the relay's end (a
// non-blocking descriptor) and the test's end.
func tcpPair(t *testing.T, ln net.Listener) (int, net.Conn) {
	t.Helper()
	test, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = test.Close() })
	relayEnd, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	f, err := relayEnd.(*net.TCPConn).File()
	_ = relayEnd.Close()
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Dup(int(f.Fd())) //nolint:gosec // a descriptor
	_ = f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	return fd, test
}

// heapLive is the live heap after a collection.
func heapLive() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// TestSlowReadersCostAtMostAPlainReadEach: clients that send far more
// than their upstreams read (the upstreams do not read at all) stall
// once the sockets' buffers are full; the relay then keeps at most one
// plain read's bytes per flow, not a whole read buffer's.
func TestSlowReadersCostAtMostAPlainReadEach(t *testing.T) {
	const flows = 100
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	r := newRelay(t, Config{Loops: 1})
	before := heapLive()
	stalled := make(chan error, flows)
	chunk := make([]byte, 256<<10)
	var ends []*events
	for range flows {
		cfd, client := tcpPair(t, ln)
		ufd, _ := tcpPair(t, ln)
		ev := newEvents()
		ends = append(ends, ev)
		if !r.Add(NewFlow(cfd, ufd, ev)) {
			t.Fatal("Add refused the flow")
		}
		// The sender writes until the relay has not taken a byte from
		// it for a second: the flow has stalled.
		go func() {
			for {
				_ = client.SetWriteDeadline(time.Now().Add(time.Second))
				if _, err := client.Write(chunk); err != nil {
					if errors.Is(err, os.ErrDeadlineExceeded) {
						err = nil
					}
					stalled <- err
					return
				}
			}
		}()
	}
	deadline := time.After(2 * time.Minute)
	for range flows {
		select {
		case err := <-stalled:
			if err != nil {
				t.Fatalf("sender: %v", err)
			}
		case <-deadline:
			t.Fatal("the senders never stalled")
		}
	}
	held := int64(heapLive()) - int64(before) //nolint:gosec // heap sizes
	// The flows themselves and the test's own connections cost a few KiB
	// each; a whole read buffer per flow would be 64 KiB.
	limit := int64(flows * (plainBytes + 4<<10))
	t.Logf("%d stalled flows hold %d KiB of heap, %.1f KiB each (limit %d KiB each)", flows, held>>10, float64(held)/flows/1024, limit/flows>>10)
	if held > limit {
		t.Fatalf("%d stalled flows hold %d KiB of heap, more than %d KiB", flows, held>>10, limit>>10)
	}
	r.Stop()
	for _, ev := range ends {
		ev.waitEnded(t)
	}
}

// TestPeekedBytesArriveOnceInOrder: towards a receiver that falls behind
// the relay peeks and takes only what was written; every byte arrives
// once and in order, both ways, over TCP (where the taking drops bytes
// without copying them).
func TestPeekedBytesArriveOnceInOrder(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	r := newRelay(t, Config{Loops: 1})
	cfd, client := tcpPair(t, ln)
	ufd, up := tcpPair(t, ln)
	ev := newEvents()
	if !r.Add(NewFlow(cfd, ufd, ev)) {
		t.Fatal("Add refused the flow")
	}
	const total = 16 << 20
	pattern := func(i int) byte { return byte(i*7 + i>>13) }
	send := func(c net.Conn) <-chan error {
		done := make(chan error, 1)
		go func() {
			b := make([]byte, 100<<10+3) // not a multiple of any read size
			for sent := 0; sent < total; {
				n := min(len(b), total-sent)
				for i := range n {
					b[i] = pattern(sent + i)
				}
				if _, err := c.Write(b[:n]); err != nil {
					done <- err
					return
				}
				sent += n
			}
			done <- c.(*net.TCPConn).CloseWrite()
		}()
		return done
	}
	// The receiver reads in small pieces, so the relay keeps meeting a
	// full socket.
	check := func(c net.Conn) error {
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Minute))
		b := make([]byte, 1500)
		got := 0
		for {
			n, err := c.Read(b)
			for i := range n {
				if b[i] != pattern(got+i) {
					return fmt.Errorf("byte %d differs", got+i)
				}
			}
			got += n
			if err != nil {
				if got == total && errors.Is(err, io.EOF) {
					return nil
				}
				return fmt.Errorf("after %d bytes: %w", got, err)
			}
		}
	}
	upDone, downDone := send(client), send(up)
	checked := make(chan error, 2)
	go func() { checked <- check(up) }()
	go func() { checked <- check(client) }()
	for _, ch := range []<-chan error{upDone, downDone, checked, checked} {
		if err := <-ch; err != nil {
			t.Fatal(err)
		}
	}
	if rep := ev.waitEnded(t); rep.sent != total || rep.received != total || rep.err != nil {
		t.Fatalf("ended with %+v, want %d both ways, no error", rep, total)
	}
}

// TestStalledFlowKeepsLittleInTheKernel: an upstream that sends far more
// than its client reads (the client reads nothing) stalls once the relay's
// sockets hold about clampRcvBuf and notsentLowat: the kernel's buffers of
// the relay's two sockets do not grow to tcp_rmem's and tcp_wmem's maxima
// (32 MiB and 4 MiB on recent kernels) for a client that fell behind. The test's own
// sockets are kept small, so what the sender gets rid of before it stalls
// is what the relay's two sockets hold.
func TestStalledFlowKeepsLittleInTheKernel(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	r := newRelay(t, Config{Loops: 1})
	cfd, client := tcpPair(t, ln)
	ufd, up := tcpPair(t, ln)
	const testBuf = 32 << 10
	if err := client.(*net.TCPConn).SetReadBuffer(testBuf); err != nil {
		t.Fatal(err)
	}
	if err := up.(*net.TCPConn).SetWriteBuffer(testBuf); err != nil {
		t.Fatal(err)
	}
	ev := newEvents()
	if !r.Add(NewFlow(cfd, ufd, ev)) {
		t.Fatal("Add refused the flow")
	}
	chunk := make([]byte, 64<<10)
	sent := 0
	for {
		_ = up.SetWriteDeadline(time.Now().Add(2 * time.Second))
		n, err := up.Write(chunk)
		sent += n
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			t.Fatalf("sender after %d bytes: %v", sent, err)
		}
		if sent > 64<<20 {
			break
		}
	}
	// The client's and the sender's sockets (2 x testBuf each, as the
	// kernel doubles them), the relay's upstream socket (clampRcvBuf,
	// doubled), its socket towards the client (notsentLowat and a peek's
	// overshoot) and one plain read. Twice that is room for the kernel's
	// accounting.
	limit := 2 * (4*testBuf + 2*clampRcvBuf + notsentLowat + readBytes + plainBytes)
	t.Logf("the sender stalled after %d KiB (limit %d KiB)", sent>>10, limit>>10)
	if sent > limit {
		t.Fatalf("the sender got %d KiB into a flow whose client reads nothing, more than %d KiB", sent>>10, limit>>10)
	}
	r.Stop()
	ev.waitEnded(t)
}

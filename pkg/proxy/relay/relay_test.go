//go:build linux

package relay

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/extractedprism/extractedprism/pkg/proxy/internal/sys"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// pair returns a socketpair: the relay's end (a non-blocking descriptor)
// and the test's end as a net.Conn.
func pair(t *testing.T) (int, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[1]), "test end") //nolint:gosec // a descriptor
	c, err := net.FileConn(f)
	_ = f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return fds[0], c
}

// events is a Handler that records what the relay reports and answers as
// told.
type events struct {
	mu        sync.Mutex
	fromCl    []byte
	firstByte bool
	failed    []error
	onFail    Verdict
	detached  chan *Flow
	ended     chan endReport
	woken     chan struct{}
}

type endReport struct {
	sent, received int64
	err            error
}

func newEvents() *events {
	return &events{detached: make(chan *Flow, 4), ended: make(chan endReport, 1), woken: make(chan struct{}, 4)}
}

func (e *events) Connected(*Flow, error) Verdict { return Continue }
func (e *events) ClientBytes(_ *Flow, b []byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.fromCl = append(e.fromCl, b...)
}

func (e *events) FirstByte(*Flow) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.firstByte = true
}

func (e *events) UpstreamFailed(_ *Flow, err error) Verdict {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.failed = append(e.failed, err)
	return e.onFail
}
func (e *events) Woken(*Flow) Verdict { e.woken <- struct{}{}; return Continue }
func (e *events) Detached(f *Flow)    { e.detached <- f }
func (e *events) Ended(_ *Flow, sent, received int64, err error) {
	e.ended <- endReport{sent, received, err}
}

func (e *events) waitEnded(t *testing.T) endReport {
	t.Helper()
	select {
	case r := <-e.ended:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("the flow never ended")
	}
	return endReport{}
}

func newRelay(t *testing.T, cfg Config) *Relay {
	t.Helper()
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	return r
}

func readN(t *testing.T, c net.Conn, n int) string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

func expectEOF(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("read = %d, %v; want EOF", n, err)
	}
}

// TestBytesAndHalfCloseBothWays: bytes go both ways, each FIN is passed on
// after the bytes before it, and the flow ends with both counts once both
// directions have ended.
func TestBytesAndHalfCloseBothWays(t *testing.T) {
	r := newRelay(t, Config{Loops: 1})
	cfd, client := pair(t)
	ufd, up := pair(t)
	ev := newEvents()
	if !r.Add(NewFlow(cfd, ufd, ev)) {
		t.Fatal("Add refused the flow")
	}
	_, _ = client.Write([]byte("hello"))
	_ = client.(*net.UnixConn).CloseWrite()
	if got := readN(t, up, 5); got != "hello" {
		t.Fatalf("upstream got %q", got)
	}
	expectEOF(t, up)
	_, _ = up.Write([]byte("answer!"))
	_ = up.(*net.UnixConn).CloseWrite()
	if got := readN(t, client, 7); got != "answer!" {
		t.Fatalf("client got %q", got)
	}
	expectEOF(t, client)
	if rep := ev.waitEnded(t); rep.sent != 5 || rep.received != 7 || rep.err != nil {
		t.Fatalf("ended with %+v, want 5 sent, 7 received, no error", rep)
	}
}

// TestSlowReaderGetsEverything: a receiver that does not read holds the
// sender back (the relay keeps at most what one read took) and gets every
// byte once it reads.
func TestSlowReaderGetsEverything(t *testing.T) {
	r := newRelay(t, Config{Loops: 1})
	cfd, client := pair(t)
	ufd, up := pair(t)
	ev := newEvents()
	r.Add(NewFlow(cfd, ufd, ev))
	const total = 4 << 20
	done := make(chan error, 1)
	go func() {
		chunk := make([]byte, 64<<10)
		for sent := 0; sent < total; sent += len(chunk) {
			if _, err := client.Write(chunk); err != nil {
				done <- err
				return
			}
		}
		done <- client.(*net.UnixConn).CloseWrite()
	}()
	_ = up.SetReadDeadline(time.Now().Add(20 * time.Second))
	n, err := io.Copy(io.Discard, up)
	if err != nil || n != total {
		t.Fatalf("upstream got %d bytes (%v), want %d", n, err, total)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestFailureBeforeFirstByteGoesToTheHandler: while watching, the client's
// bytes are reported; the upstream's close goes to the Handler, which may
// take the flow out of its loop, give it a new upstream with bytes to
// resend and give it back; the first byte of the new upstream ends the
// watch.
func TestFailureBeforeFirstByteGoesToTheHandler(t *testing.T) {
	r := newRelay(t, Config{Loops: 1})
	cfd, client := pair(t)
	ufd, up := pair(t)
	ev := newEvents()
	ev.onFail = Detach
	f := NewFlow(cfd, ufd, ev)
	f.Watch()
	r.Add(f)
	_, _ = client.Write([]byte("hello"))
	if got := readN(t, up, 5); got != "hello" {
		t.Fatalf("first upstream got %q", got)
	}
	_ = up.Close() // fails before answering
	var out *Flow
	select {
	case out = <-ev.detached:
	case <-time.After(10 * time.Second):
		t.Fatal("the flow was not handed to its Handler")
	}
	ev.mu.Lock()
	if string(ev.fromCl) != "hello" || len(ev.failed) != 1 || !errors.Is(ev.failed[0], io.EOF) {
		t.Errorf("client bytes %q, failures %v; want hello and one EOF", ev.fromCl, ev.failed)
	}
	ev.mu.Unlock()
	ufd2, up2 := pair(t)
	out.ReplaceUpstream(ufd2, false, []byte("hello"))
	if !r.Add(out) {
		t.Fatal("Add refused the flow back")
	}
	if got := readN(t, up2, 5); got != "hello" {
		t.Fatalf("second upstream got %q, want the resent bytes", got)
	}
	_, _ = up2.Write([]byte("hi"))
	if got := readN(t, client, 2); got != "hi" {
		t.Fatalf("client got %q", got)
	}
	ev.mu.Lock()
	if !ev.firstByte {
		t.Error("no first byte reported")
	}
	ev.mu.Unlock()
	_ = client.Close()
	_ = up2.Close()
	ev.waitEnded(t)
}

// TestWakeReachesTheHandler: Wake makes the loop call Woken; Kill ends the
// flow and closes both sockets.
func TestWakeReachesTheHandler(t *testing.T) {
	r := newRelay(t, Config{Loops: 1})
	cfd, client := pair(t)
	ufd, up := pair(t)
	ev := newEvents()
	f := NewFlow(cfd, ufd, ev)
	r.Add(f)
	f.Wake()
	select {
	case <-ev.woken:
	case <-time.After(10 * time.Second):
		t.Fatal("Woken never called")
	}
	f.Kill()
	ev.waitEnded(t)
	expectEOF(t, client)
	expectEOF(t, up)
}

// TestDeadLoopEndsItsFlowsAndTakesNoMore: a loop whose wait fails ends
// its flows, says why (Err), and Add skips it; with no live loop left Add
// refuses.
func TestDeadLoopEndsItsFlowsAndTakesNoMore(t *testing.T) {
	var mu sync.Mutex
	dead := map[int]bool{}
	wait := func(loop, epfd int, events []unix.EpollEvent) (int, error) {
		mu.Lock()
		d := dead[loop]
		mu.Unlock()
		if d {
			return 0, unix.EBADF
		}
		return sys.EpollWait(epfd, events)
	}
	r := newRelay(t, Config{Loops: 2, Wait: wait})
	cfd, client := pair(t)
	ufd, _ := pair(t)
	ev := newEvents()
	r.Add(NewFlow(cfd, ufd, ev)) // loop 0
	mu.Lock()
	dead[0] = true
	mu.Unlock()
	_, _ = client.Write([]byte("x")) // wakes loop 0, which fails
	if rep := ev.waitEnded(t); !errors.Is(rep.err, ErrStopped) {
		t.Fatalf("flow of the dead loop ended with %v, want ErrStopped", rep.err)
	}
	var lf *LoopFailure
	if err := r.Err(); !errors.As(err, &lf) || lf.Index != 0 || !errors.Is(err, unix.EBADF) {
		t.Fatalf("Err() = %v, want loop 1 of 2 failed with EBADF", err)
	}
	for range 3 { // each goes to loop 1, whatever the round robin says
		cfd, client := pair(t)
		ufd, up := pair(t)
		ev := newEvents()
		if !r.Add(NewFlow(cfd, ufd, ev)) {
			t.Fatal("Add refused a flow with a live loop left")
		}
		_, _ = client.Write([]byte("y"))
		if got := readN(t, up, 1); got != "y" {
			t.Fatalf("got %q", got)
		}
		_ = client.Close()
		_ = up.Close()
		ev.waitEnded(t)
	}
	mu.Lock()
	dead[1] = true
	mu.Unlock()
	cfd2, client2 := pair(t)
	ufd2, _ := pair(t)
	ev2 := newEvents()
	r.Add(NewFlow(cfd2, ufd2, ev2))
	_, _ = client2.Write([]byte("z"))
	ev2.waitEnded(t)
	f := NewFlow(-1, -1, newEvents())
	if r.Add(f) {
		t.Fatal("Add took a flow with every loop dead")
	}
}

//go:build linux

package integration

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/internal/standin"
)

// clientSNI is the server name test clients send. It lets an upstream
// under test tell client connections (carrying it in the TLS ClientHello)
// from the daemon's probes (which connect to an IP and send no SNI).
const clientSNI = "client.integration.invalid"

// requestTimeout bounds one client request through the proxy. It is
// larger than the proxy's first-byte timeout (5 s), so a handshake
// replayed away from a silent upstream still counts as a success.
const requestTimeout = 20 * time.Second

func insecureTLS(serverName string) *tls.Config {
	return &tls.Config{
		InsecureSkipVerify: true, //nolint:gosec // stand-ins use self-signed certificates
		ServerName:         serverName,
		NextProtos:         []string{"http/1.1"},
		MinVersion:         tls.VersionTLS12,
	}
}

// dialTLS opens a TLS connection to addr (through the proxy, usually) and
// completes the handshake.
func dialTLS(addr string, timeout time.Duration) (*tls.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", addr, err)
	}
	_ = c.SetDeadline(time.Now().Add(timeout))
	tc := tls.Client(c, insecureTLS(clientSNI))
	if err := tc.Handshake(); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("TLS handshake via %s: %w", addr, err)
	}
	return tc, nil
}

// getRoot opens a new connection to addr, does GET / over HTTP/1.1 and
// returns the name of the stand-in that answered.
func getRoot(addr string) (string, error) {
	tc, err := dialTLS(addr, requestTimeout)
	if err != nil {
		return "", err
	}
	defer func() { _ = tc.Close() }()
	if _, err := fmt.Fprintf(tc, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr); err != nil {
		return "", fmt.Errorf("send request via %s: %w", addr, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		return "", fmt.Errorf("read response via %s: %w", addr, err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("read body via %s: %w", addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET / via %s: %s: %s", addr, resp.Status, body)
	}
	var info standin.RootInfo
	if err := json.Unmarshal(body, &info); err != nil || info.Name == "" {
		return "", fmt.Errorf("GET / via %s: unexpected body %q", addr, body)
	}
	return info.Name, nil
}

// stream is a long GET /stream through the proxy, read line by line.
type stream struct {
	conn   *tls.Conn
	server string
	done   chan struct{}

	mu      sync.Mutex
	lines   int
	lastAt  time.Time
	endedAt time.Time
	err     error
}

// openStream starts GET /stream?interval=... via addr and waits for the
// first line.
func openStream(t testing.TB, addr string, interval time.Duration) *stream {
	t.Helper()
	tc, err := dialTLS(addr, requestTimeout)
	if err != nil {
		t.Fatalf("open stream: %v", err)
	}
	s := &stream{conn: tc, done: make(chan struct{})}
	t.Cleanup(func() {
		_ = tc.Close()
		<-s.done
	})
	if _, err := fmt.Fprintf(tc, "GET /stream?interval=%s HTTP/1.1\r\nHost: %s\r\n\r\n", interval, addr); err != nil {
		close(s.done)
		t.Fatalf("send stream request: %v", err)
	}
	br := bufio.NewReader(tc)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		close(s.done)
		t.Fatalf("read stream response: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		close(s.done)
		t.Fatalf("stream: %s", resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	if !sc.Scan() {
		close(s.done)
		t.Fatalf("stream ended before its first line: %v", sc.Err())
	}
	var ev standin.StreamEvent
	if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
		close(s.done)
		t.Fatalf("stream line %q: %v", sc.Bytes(), err)
	}
	s.server, s.lines, s.lastAt = ev.Server, 1, time.Now()
	// The read deadline of the handshake must not end the stream.
	_ = tc.SetDeadline(time.Time{})
	go s.read(sc)
	return s
}

func (s *stream) read(sc *bufio.Scanner) {
	defer close(s.done)
	for sc.Scan() {
		s.mu.Lock()
		s.lines++
		s.lastAt = time.Now()
		s.mu.Unlock()
	}
	s.mu.Lock()
	s.endedAt, s.err = time.Now(), sc.Err()
	s.mu.Unlock()
}

// count returns the lines received so far and when the last one came.
func (s *stream) count() (int, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lines, s.lastAt
}

func (s *stream) ended() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// end returns when the stream ended and how (nil error = clean EOF).
func (s *stream) end() (time.Time, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.endedAt, s.err
}

// waitLines waits until the stream has received n more lines than now.
func (s *stream) waitLines(t testing.TB, n int, d time.Duration) {
	t.Helper()
	base, _ := s.count()
	waitFor(t, d, fmt.Sprintf("%d more stream lines", n), func() (bool, string) {
		c, _ := s.count()
		if s.ended() && c < base+n {
			at, err := s.end()
			t.Fatalf("stream from %s ended at %s (err %v) after %d lines, want %d more", s.server, at.Format(time.StampMilli), err, c, n)
		}
		return c >= base+n, fmt.Sprintf("%d lines", c)
	})
}

// loadResult is one client request of a load loop.
type loadResult struct {
	at     time.Time
	server string
	err    error
}

// load runs workers that each do getRoot via addr in a loop, a new
// connection per request, until stop. Requests hold gate for reading, so
// a test can take it for writing to act between requests.
type load struct {
	addr string
	gate sync.RWMutex
	quit chan struct{}
	wg   sync.WaitGroup
	n    atomic.Int64

	mu      sync.Mutex
	results []loadResult
}

func startLoad(t testing.TB, addr string, workers int) *load {
	l := &load{addr: addr, quit: make(chan struct{})}
	for range workers {
		l.wg.Add(1)
		go l.worker()
	}
	t.Cleanup(l.stop)
	return l
}

func (l *load) worker() {
	defer l.wg.Done()
	for {
		select {
		case <-l.quit:
			return
		default:
		}
		l.gate.RLock()
		name, err := getRoot(l.addr)
		l.gate.RUnlock()
		l.n.Add(1)
		l.mu.Lock()
		l.results = append(l.results, loadResult{at: time.Now(), server: name, err: err})
		l.mu.Unlock()
	}
}

// stop ends the workers and waits for them; it is idempotent.
func (l *load) stop() {
	select {
	case <-l.quit:
	default:
		close(l.quit)
	}
	l.wg.Wait()
}

// snapshot returns the results so far.
func (l *load) snapshot() []loadResult {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]loadResult(nil), l.results...)
}

// waitRequests waits until n more requests have completed.
func (l *load) waitRequests(t testing.TB, n int64) {
	t.Helper()
	base := l.n.Load()
	waitFor(t, 2*waitTimeout, fmt.Sprintf("%d more client requests", n), func() (bool, string) {
		c := l.n.Load()
		return c >= base+n, fmt.Sprintf("%d done", c-base)
	})
}

// failures returns the failed requests.
func failures(rs []loadResult) []loadResult {
	var out []loadResult
	for _, r := range rs {
		if r.err != nil {
			out = append(out, r)
		}
	}
	return out
}

// reportFailures fails the test listing every failed request.
func reportFailures(t testing.TB, rs []loadResult) {
	t.Helper()
	f := failures(rs)
	if len(f) == 0 {
		return
	}
	for i, r := range f {
		if i == 20 {
			t.Errorf("... and %d more", len(f)-20)
			break
		}
		t.Errorf("client request failed at %s: %v", r.at.Format("15:04:05.000"), r.err)
	}
	t.Errorf("%d of %d client requests failed, want 0", len(f), len(rs))
}

// freezer is a TCP forwarder in front of a real stand-in that can be
// frozen: from then on it answers nothing, on the connections it already
// forwards (including the balancer's kept-alive probe connection) and on
// new ones, which it still accepts. That is an apiserver that hangs.
//
// It reads what peers send first only to tell proxied client connections
// (their TLS ClientHello carries clientSNI) from probes; the peer cannot
// see the difference, the kernel acks the bytes either way.
type freezer struct {
	ln      net.Listener
	backend string
	frozen  atomic.Bool
	closing chan struct{}
	accepts atomic.Int64
	clients atomic.Int64
	wg      sync.WaitGroup

	mu     sync.Mutex
	conns  []net.Conn
	closed bool
}

// startFreezer listens on a free loopback port and forwards to backend.
func startFreezer(t testing.TB, backend string) *freezer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{ln: ln, backend: backend, closing: make(chan struct{})}
	f.wg.Add(1)
	go f.serve()
	t.Cleanup(f.close)
	return f
}

func (f *freezer) addr() string { return f.ln.Addr().String() }

// freeze stops all forwarding for good.
func (f *freezer) freeze() { f.frozen.Store(true) }

// keep registers c for closing; false if the freezer is closed already.
func (f *freezer) keep(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		_ = c.Close()
		return false
	}
	f.conns = append(f.conns, c)
	return true
}

func (f *freezer) serve() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.accepts.Add(1)
		if !f.keep(c) {
			return
		}
		f.wg.Add(1)
		go f.handle(c)
	}
}

func (f *freezer) handle(c net.Conn) {
	defer f.wg.Done()
	var b net.Conn
	if !f.frozen.Load() {
		var err error
		b, err = net.DialTimeout("tcp", f.backend, requestTimeout)
		if err != nil || !f.keep(b) {
			_ = c.Close()
			return
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			f.copy(c, b, false)
		}()
	}
	f.copy(b, c, true)
}

// copy forwards src to dst (dst nil: nowhere) until frozen; then it only
// goes on reading while it looks for clientSNI, and parks until the
// freezer closes.
func (f *freezer) copy(dst, src net.Conn, classify bool) {
	var seen []byte
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if classify && n > 0 {
			seen = append(seen, buf[:n]...)
			if bytes.Contains(seen, []byte(clientSNI)) {
				f.clients.Add(1)
				classify = false
			} else if len(seen) > 16<<10 {
				classify = false
			}
		}
		if f.frozen.Load() || dst == nil {
			if classify && err == nil {
				continue
			}
			<-f.closing
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				_ = src.Close()
				return
			}
		}
		if err != nil {
			_ = dst.Close()
			return
		}
	}
}

func (f *freezer) close() {
	_ = f.ln.Close()
	f.mu.Lock()
	f.closed = true
	close(f.closing)
	for _, c := range f.conns {
		_ = c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

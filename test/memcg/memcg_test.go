//go:build linux

package memcg

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// memLimits are the cgroup limits the daemon runs under: the one the
// chart and the static pod ship with, and half of it.
var memLimits = []int64{128 << 20, 64 << 20}

// The load and the limits.
const (
	slowClients = 1000
	idleClients = 10000
	// slowRate is what each slow reader reads per second: far less than
	// a stand-in sends, so the daemon's writes to it block.
	slowRate = 64 << 10
	// slowProgress is what every slow reader must read once all clients
	// are open, to count as making progress.
	slowProgress = 128 << 10
	// slowBody is the /bulk body each slow reader asks for, more than it
	// reads before the test ends.
	slowBody = 1 << 30
	// idleSample idle connections are asked for another answer.
	idleSample = 200
	dialers    = 32
	// extraClients more connections are tried beyond the load, limitRoom
	// of them fit under the limit, and the daemon may let limitSlack more
	// in than the limit (a count that lags a close by a moment).
	extraClients = 1000
	limitRoom    = 500
	limitSlack   = 16
	// fdReserve descriptors of the daemon are kept for its listeners,
	// probes, refused connections and the runtime.
	fdReserve = 256
	// minNofile is the least RLIMIT_NOFILE that leaves room for the slow
	// readers and a thousand idle connections.
	minNofile = 2*(slowClients+1000+limitRoom+100) + fdReserve
	// refuseWithin is how soon a connection beyond the limit must be
	// closed; anything slower counts as a hang.
	refuseWithin = 5 * time.Second
	// memReturnWithin is how long the daemon's RSS may take to come back
	// once the clients are gone (the Go runtime returns freed memory to
	// the kernel gradually, after a GC).
	memReturnWithin = 4 * time.Minute
)

func tlsConf() *tls.Config {
	return &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} //nolint:gosec // self-signed stand-ins on loopback
}

// dialTLS opens a TLS connection through addr, every step within d.
func dialTLS(ctx context.Context, addr string, d time.Duration) (*tls.Conn, error) {
	return dialTLSBuf(ctx, addr, d, 0)
}

// slowRcvBuf is a slow reader's socket receive buffer. A slow client's
// small window keeps what is in flight towards it small on every hop; with
// the kernel's default autotuning 1,000 slow readers of this one machine
// (the test's, the daemon's and the stand-ins' sockets all count) reach
// the system-wide net.ipv4.tcp_mem and the kernel aborts connections
// ("TCP: out of memory"), whatever the balancer does.
const slowRcvBuf = 64 << 10

// standinSndBuf is the stand-ins' SO_SNDBUF.
const standinSndBuf = 128 << 10

// dialTLSBuf is dialTLS with SO_RCVBUF set before the connect (0: the
// kernel's autotuning).
func dialTLSBuf(ctx context.Context, addr string, d time.Duration, rcvbuf int) (*tls.Conn, error) {
	dl := net.Dialer{Timeout: d}
	if rcvbuf > 0 {
		dl.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf) //nolint:gosec // a descriptor
			}); err != nil {
				return err
			}
			return serr
		}
	}
	raw, err := dl.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	_ = raw.SetDeadline(time.Now().Add(d))
	c := tls.Client(raw, tlsConf())
	if err := c.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	return c, nil
}

// idleConn is a keep-alive connection that answered a request and waits.
type idleConn struct {
	c  *tls.Conn
	br *bufio.Reader
}

// request sends GET /readyz on the connection and reads the whole answer,
// within d.
func (ic *idleConn) request(d time.Duration) error {
	_ = ic.c.SetDeadline(time.Now().Add(d))
	defer func() { _ = ic.c.SetDeadline(time.Time{}) }()
	if _, err := io.WriteString(ic.c, "GET /readyz HTTP/1.1\r\nHost: kubernetes\r\n\r\n"); err != nil {
		return err
	}
	resp, err := http.ReadResponse(ic.br, nil)
	if err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("status %s", resp.Status)
	}
	return err
}

func openIdle(ctx context.Context, addr string) (*idleConn, error) {
	c, err := dialTLS(ctx, addr, 15*time.Second)
	if err != nil {
		return nil, err
	}
	ic := &idleConn{c: c, br: bufio.NewReaderSize(c, 1024)}
	if err := ic.request(15 * time.Second); err != nil {
		_ = c.Close()
		return nil, err
	}
	return ic, nil
}

// slowReader downloads /bulk and reads it at slowRate.
type slowReader struct {
	c    *tls.Conn
	read atomic.Int64
	err  atomic.Pointer[error]
}

func openSlow(ctx context.Context, addr string) (*slowReader, error) {
	c, err := dialTLSBuf(ctx, addr, 15*time.Second, slowRcvBuf)
	if err != nil {
		return nil, err
	}
	if _, err := fmt.Fprintf(c, "GET /bulk?bytes=%d HTTP/1.1\r\nHost: kubernetes\r\n\r\n", slowBody); err != nil {
		_ = c.Close()
		return nil, err
	}
	head := make([]byte, 12)
	if _, err := io.ReadFull(c, head); err != nil || string(head[9:12]) != "200" {
		_ = c.Close()
		return nil, fmt.Errorf("answer %q: %v", head, err)
	}
	_ = c.SetDeadline(time.Time{})
	return &slowReader{c: c}, nil
}

// pace reads at slowRate until ctx ends; a read that waits longer than a
// minute means the daemon stopped forwarding.
func (r *slowReader) pace(ctx context.Context) {
	buf := make([]byte, 16<<10)
	start := time.Now()
	var got int64
	for ctx.Err() == nil {
		due := start.Add(time.Duration(float64(got) / slowRate * float64(time.Second)))
		if w := time.Until(due); w > 0 {
			t := time.NewTimer(w)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		_ = r.c.SetReadDeadline(time.Now().Add(time.Minute))
		n, err := r.c.Read(buf)
		got += int64(n)
		r.read.Add(int64(n))
		if err != nil {
			if ctx.Err() == nil {
				r.err.CompareAndSwap(nil, &err)
			}
			return
		}
	}
}

// openMany opens n connections with open, dialers at a time, and stops
// early when ctx ends; it returns those opened and the first error.
func openMany[T any](ctx context.Context, n int, open func(context.Context) (T, error)) ([]T, error) {
	out := make([]T, n)
	ok := make([]bool, n)
	var next atomic.Int64
	var mu sync.Mutex
	var firstErr error
	var wg sync.WaitGroup
	for range dialers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				c, err := open(ctx)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("connection %d: %w", i, err)
					}
					mu.Unlock()
					continue
				}
				out[i], ok[i] = c, true
			}
		})
	}
	wg.Wait()
	var opened []T
	for i := range out {
		if ok[i] {
			opened = append(opened, out[i])
		}
	}
	return opened, firstErr
}

// monitor samples the daemon and its cgroup until stopped.
type monitor struct {
	cg   *cgroup
	d    *proc
	mu   sync.Mutex
	peak int64 // the daemon's highest RSS seen
	stop chan struct{}
	wg   sync.WaitGroup
}

func startMonitor(cg *cgroup, d *proc) *monitor {
	m := &monitor{cg: cg, d: d, stop: make(chan struct{})}
	m.wg.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			if r := rssBytes(d.pid()); r > 0 {
				m.mu.Lock()
				m.peak = max(m.peak, r)
				m.mu.Unlock()
			}
			select {
			case <-m.stop:
				return
			case <-t.C:
			}
		}
	})
	return m
}

func (m *monitor) end() {
	close(m.stop)
	m.wg.Wait()
}

func (m *monitor) peakRSS() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peak
}

// state describes the daemon and its cgroup for messages and logs.
func (m *monitor) state() string {
	alive := "alive"
	if m.d.exited() {
		alive = fmt.Sprintf("exited (%v)", m.d.state)
	}
	return fmt.Sprintf("extractedprism %s, RSS %s (peak %s); %s: usage %s (kernel %s), peak %s, limit %s, limit reached %d times, OOM kills %d",
		alive, mib(rssBytes(m.d.pid())), mib(m.peakRSS()), m.cg.version(), mib(m.cg.usage()), mib(m.cg.kernelUsage()), mib(m.cg.peak()), mib(m.cg.limit),
		m.cg.limitHits(), m.cg.oomKills())
}

// check fails the test at once when the daemon died or was OOM-killed.
func (m *monitor) check(t testing.TB, when string) {
	t.Helper()
	if m.d.exited() || m.cg.oomKills() > 0 {
		t.Fatalf("%s: %s", when, m.state())
	}
}

func mib(b int64) string {
	if b < 0 {
		return "unknown"
	}
	return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
}

// load is how many connections the test opens.
type load struct {
	slow, idle int
	// limit is proxy.max_connections in force (the daemon's default).
	limit int
}

// sizeLoad is the load under the daemon's connection limit: 1,000 slow
// readers and up to 10,000 idle connections, as many as fit limitRoom
// below the limit, so that the connections tried beyond the load meet
// it.
//
// EP_MEMCG_SLOW_READERS and EP_MEMCG_IDLE replace the counts of slow
// readers and idle connections, to find out how much fits.
func sizeLoad(t testing.TB, limit int) load {
	l := load{slow: envInt(t, "EP_MEMCG_SLOW_READERS", slowClients), idle: envInt(t, "EP_MEMCG_IDLE", idleClients), limit: limit}
	l.idle = max(0, min(l.idle, limit-limitRoom-l.slow))
	return l
}

func envInt(t testing.TB, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		t.Fatalf("%s=%q: want a count", name, v)
	}
	return n
}

// TestMemoryLimit runs the daemon with its defaults in a memory cgroup
// in front of three stand-ins, under the limit the chart and the static
// pod ship with (128Mi) and under half of it, opens 1,000 slow readers
// and up to 10,000 idle connections, as many as its default
// proxy.max_connections admits, then more beyond it, and checks that it
// is never OOM-killed, that every connection it accepted keeps working,
// that those beyond the limit are closed at once, and that its memory
// comes back once they are closed.
func TestMemoryLimit(t *testing.T) {
	if skipReason != "" {
		t.Skip(skipReason)
	}
	for _, limit := range memLimits {
		t.Run(fmt.Sprintf("%dMi", limit>>20), func(t *testing.T) { testMemoryLimit(t, limit) })
	}
}

func testMemoryLimit(t *testing.T, memLimit int64) {
	var ups []string
	for _, name := range []string{"a", "b", "c"} {
		addr := loopback(freePort(t))
		// A real apiserver's socket memory is on its own machine: keep the
		// stand-ins' small (see slowRcvBuf).
		p := startProc(t, "standin "+name, standinBin, "--listen", addr, "--name", name, "--log-level", "warn",
			"--send-buffer", strconv.Itoa(standinSndBuf))
		p.waitOutput(t, "listening on")
		ups = append(ups, addr)
	}

	cg, err := newCgroup(fmt.Sprintf("extractedprism-memcg-%d-%d", os.Getpid(), memLimit>>20), memLimit)
	if err != nil {
		t.Fatal(err)
	}
	// Registered before the daemon's cleanup so that it runs after the
	// daemon is killed.
	t.Cleanup(func() {
		if err := cg.remove(); err != nil {
			t.Error(err)
		}
	})

	port, adminPort := freePort(t), freePort(t)
	listen, admin := loopback(port), loopback(adminPort)
	args := []string{"run", "--endpoints", strings.Join(ups, ","),
		"--bind-address", "127.0.0.1", "--bind-port", strconv.Itoa(port), "--health-port", strconv.Itoa(adminPort),
		"--health-interval", "1s", "--health-timeout", "1s", "--state-file", "", "--log-level", "info"}
	// The shell joins the cgroup and raises the descriptor limit, then
	// becomes the daemon: everything the daemon allocates is charged to
	// the cgroup from its first instruction.
	d := startProc(t, "extractedprism", append([]string{"/bin/sh", "-c",
		`echo $$ > "$1" && ulimit -n "$2" && shift 2 && exec "$@"`, "sh", cg.procsFile(), strconv.FormatUint(nofile, 10), daemonBin}, args...)...)
	waitFor(t, startTimeout, "extractedprism /readyz 200", func() (bool, string) {
		if d.exited() {
			t.Fatalf("extractedprism exited during start-up: %v", d.state)
		}
		code, body, err := adminGet(admin, "/readyz")
		return err == nil && code == http.StatusOK, fmt.Sprintf("%d %q %v", code, body, err)
	})
	limit, err := maxConnections(admin)
	if err != nil {
		t.Fatal(err)
	}
	ld := sizeLoad(t, limit)
	t.Logf("cgroup limit %s, RLIMIT_NOFILE %d: the daemon's default proxy.max_connections is %d; load %d slow readers, %d idle connections, then %d more",
		mib(memLimit), nofile, limit, ld.slow, ld.idle, extraClients)
	if ld.slow+limitRoom > limit {
		t.Fatalf("proxy.max_connections %d leaves no room for %d slow readers", limit, ld.slow)
	}
	mon := startMonitor(cg, d)
	defer mon.end()
	base := rssBytes(d.pid())
	t.Logf("extractedprism ready in %s (%s), RSS %s, cgroup usage %s", cg.version(), cg.dir, mib(base), mib(cg.usage()))

	// Everything below stops early when the daemon dies.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-d.done:
			cancel()
		case <-ctx.Done():
		}
	}()

	began := time.Now()
	slow, err := openMany(ctx, ld.slow, func(ctx context.Context) (*slowReader, error) { return openSlow(ctx, listen) })
	var readers sync.WaitGroup
	stopReading, stopReaders := context.WithCancel(ctx)
	defer stopReaders()
	for _, r := range slow {
		readers.Go(func() { r.pace(stopReading) })
	}
	defer func() {
		stopReaders()
		for _, r := range slow {
			_ = r.c.Close()
		}
		readers.Wait()
	}()
	mon.check(t, fmt.Sprintf("after opening %d slow readers", len(slow)))
	if len(slow) != ld.slow {
		t.Fatalf("opened %d of %d slow readers; first error: %v; %s", len(slow), ld.slow, err, mon.state())
	}
	t.Logf("%d slow readers open after %s: %s", len(slow), time.Since(began).Round(time.Millisecond), mon.state())

	idle, err := openMany(ctx, ld.idle, func(ctx context.Context) (*idleConn, error) { return openIdle(ctx, listen) })
	defer func() {
		for _, c := range idle {
			_ = c.c.Close()
		}
	}()
	mon.check(t, fmt.Sprintf("after opening %d idle connections", len(idle)))
	if len(idle) != ld.idle {
		t.Fatalf("opened %d of %d idle connections; first error: %v; %s", len(idle), ld.idle, err, mon.state())
	}
	t.Logf("%d idle connections open after %s: %s", len(idle), time.Since(began).Round(time.Millisecond), mon.state())

	// Every slow reader makes progress with everything open.
	from := make([]int64, len(slow))
	for i, r := range slow {
		from[i] = r.read.Load()
	}
	took := waitFor(t, 3*time.Minute, fmt.Sprintf("every slow reader to read %d KiB more", slowProgress>>10), func() (bool, string) {
		mon.check(t, "while the slow readers read")
		behind := 0
		for i, r := range slow {
			if e := r.err.Load(); e != nil {
				t.Fatalf("slow reader %d failed after %d bytes: %v; %s", i, r.read.Load(), *e, mon.state())
			}
			if r.read.Load()-from[i] < slowProgress {
				behind++
			}
		}
		return behind == 0, fmt.Sprintf("%d readers behind", behind)
	})
	t.Logf("every slow reader read %d KiB more within %s: %s", slowProgress>>10, took.Round(time.Millisecond), mon.state())

	checkIdle(t, mon, idle, "with the load open")

	checkLimit(t, ctx, mon, listen, admin, len(slow)+len(idle), ld.limit)
	checkIdle(t, mon, idle, "after the connections beyond the limit")
	mon.check(t, "with the load open")
	peak := mon.peakRSS()
	t.Logf("under load: %s", mon.state())

	// Everything ends: the memory must come back.
	stopReaders()
	for _, r := range slow {
		_ = r.c.Close()
	}
	readers.Wait()
	for _, c := range idle {
		_ = c.c.Close()
	}
	margin := max(16<<20, (peak-base)/2)
	took = waitFor(t, memReturnWithin, fmt.Sprintf("the RSS to come back to within %s of the %s before the load", mib(margin), mib(base)), func() (bool, string) {
		mon.check(t, "after the load")
		r := rssBytes(d.pid())
		return r <= base+margin, mon.state()
	})
	t.Logf("RSS back to %s (before the load %s, peak %s) %s after the clients closed", mib(rssBytes(d.pid())), mib(base), mib(peak), took.Round(time.Millisecond))
	code, _, err := adminGet(admin, "/readyz")
	if err != nil || code != http.StatusOK {
		t.Errorf("/readyz after the load: %d %v", code, err)
	}
	if n := cg.oomKills(); n != 0 {
		t.Errorf("OOM kills in the cgroup: %d", n)
	}
	t.Logf("at the end: %s", mon.state())
}

// checkIdle asks a sample of the idle connections for another answer.
func checkIdle(t *testing.T, mon *monitor, idle []*idleConn, when string) {
	t.Helper()
	step := max(1, len(idle)/idleSample)
	failed, asked := 0, 0
	var first error
	for i := 0; i < len(idle); i += step {
		asked++
		if err := idle[i].request(30 * time.Second); err != nil {
			failed++
			if first == nil {
				first = fmt.Errorf("idle connection %d: %w", i, err)
			}
		}
	}
	mon.check(t, "asking the idle connections "+when)
	if failed > 0 {
		t.Fatalf("%d of %d idle connections failed a request %s; first: %v; %s", failed, asked, when, first, mon.state())
	}
	t.Logf("%d idle connections answered a request %s", asked, when)
}

// maxConnections reads the daemon's proxy.max_connections from /status.
func maxConnections(admin string) (int, error) {
	code, body, err := adminGet(admin, "/status")
	if err != nil || code != http.StatusOK {
		return 0, fmt.Errorf("/status: %d %v", code, err)
	}
	var st struct {
		Max int `json:"max_connections"`
	}
	if err := json.Unmarshal([]byte(body), &st); err != nil || st.Max <= 0 {
		return 0, fmt.Errorf("/status max_connections %d: %v", st.Max, err)
	}
	return st.Max, nil
}

// checkLimit tries extraClients more connections with open already open:
// those under the limit must work, those beyond it must be closed at once
// (EOF or reset within refuseWithin), none may hang, and the daemon must
// count the refusals.
func checkLimit(t *testing.T, ctx context.Context, mon *monitor, listen, admin string, open, maxConnections int) {
	t.Helper()
	var accepted []*idleConn
	var mu sync.Mutex
	var refused, hung atomic.Int64
	var slowest atomic.Int64
	var firstHang, firstOther error
	var wg sync.WaitGroup
	var next atomic.Int64
	for range dialers {
		wg.Go(func() {
			for int(next.Add(1)) <= extraClients && ctx.Err() == nil {
				t0 := time.Now()
				c, err := openIdleWithin(ctx, listen, refuseWithin+10*time.Second)
				el := time.Since(t0)
				mu.Lock()
				switch {
				case err == nil:
					accepted = append(accepted, c)
				case isClosed(err) && el <= refuseWithin:
					refused.Add(1)
					if int64(el) > slowest.Load() {
						slowest.Store(int64(el))
					}
				case isClosed(err):
					hung.Add(1)
					if firstHang == nil {
						firstHang = fmt.Errorf("closed only after %s: %w", el.Round(time.Millisecond), err)
					}
				default:
					hung.Add(1)
					if firstOther == nil {
						firstOther = fmt.Errorf("after %s: %w", el.Round(time.Millisecond), err)
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	defer func() {
		for _, c := range accepted {
			_ = c.c.Close()
		}
	}()
	mon.check(t, "after the connections beyond the limit")
	t.Logf("%d connections open, %d more tried with proxy.max_connections %d: %d accepted, %d closed at once (slowest %s), %d hung or failed otherwise",
		open, extraClients, maxConnections, len(accepted), refused.Load(), time.Duration(slowest.Load()).Round(time.Millisecond), hung.Load())
	if hung.Load() > 0 {
		t.Errorf("%d connections beyond the limit were neither served nor closed within %s; first: %v %v", hung.Load(), refuseWithin, firstHang, firstOther)
	}
	if refused.Load() == 0 {
		t.Errorf("no connection was refused with %d open and %d more tried, limit %d", open, extraClients, maxConnections)
	}
	if n := open + len(accepted); n > maxConnections+limitSlack {
		t.Errorf("%d connections served at once, limit %d", n, maxConnections)
	}
	if len(accepted) == 0 && open < maxConnections {
		t.Errorf("no connection accepted with %d open, under the limit of %d", open, maxConnections)
	}
	for _, c := range accepted {
		if err := c.request(30 * time.Second); err != nil {
			t.Errorf("a connection accepted under the limit failed its second request: %v", err)
			break
		}
	}
	code, body, err := adminGet(admin, "/metrics")
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", code, err)
	}
	counted, found := 0.0, false
	for l := range strings.SplitSeq(body, "\n") {
		name, v, ok := strings.Cut(l, " ")
		if ok && (name == "extractedprism_connections_refused_total" || strings.HasPrefix(name, "extractedprism_connections_refused_total{")) {
			n, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			counted += n
			found = true
		}
	}
	switch {
	case !found:
		t.Errorf("/metrics has no extractedprism_connections_refused_total")
	case counted < float64(refused.Load()):
		t.Errorf("extractedprism_connections_refused_total %v, but %d connections were closed at once", counted, refused.Load())
	default:
		t.Logf("extractedprism_connections_refused_total %v", counted)
	}
}

// openIdleWithin is openIdle with every step bounded by d.
func openIdleWithin(ctx context.Context, addr string, d time.Duration) (*idleConn, error) {
	c, err := dialTLS(ctx, addr, d)
	if err != nil {
		return nil, err
	}
	ic := &idleConn{c: c, br: bufio.NewReaderSize(c, 1024)}
	if err := ic.request(d); err != nil {
		_ = c.Close()
		return nil, err
	}
	return ic, nil
}

// isClosed tells a connection the other side closed or reset (as opposed
// to one that timed out).
func isClosed(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false
	}
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE) || slices.ContainsFunc([]string{"connection reset", "broken pipe", "EOF"}, func(s string) bool {
		return strings.Contains(err.Error(), s)
	})
}

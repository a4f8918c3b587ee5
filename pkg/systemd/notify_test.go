package systemd

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(childModeEnv); mode != "" {
		os.Exit(runChild(mode))
	}
	goleak.VerifyTestMain(m)
}

// notifySocket is a unixgram socket standing in for systemd's notify socket.
type notifySocket struct {
	t    *testing.T
	conn *net.UnixConn
}

// newNotifySocket binds a notify socket in a temporary directory and points
// NOTIFY_SOCKET at it for the duration of the test.
func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	dir, err := os.MkdirTemp("", "sdnotify")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen %s: %v", path, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return &notifySocket{t: t, conn: conn}
}

// next returns the next datagram, failing the test if none arrives within d.
func (s *notifySocket) next(d time.Duration) string {
	s.t.Helper()
	msg, ok := s.recv(d)
	if !ok {
		s.t.Fatalf("no notify message within %v", d)
	}
	return msg
}

// recv returns the next datagram received within d, or false.
func (s *notifySocket) recv(d time.Duration) (string, bool) {
	s.t.Helper()
	if err := s.conn.SetReadDeadline(time.Now().Add(d)); err != nil {
		s.t.Fatal(err)
	}
	buf := make([]byte, 4096)
	n, err := s.conn.Read(buf)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return "", false
		}
		s.t.Fatalf("read notify socket: %v", err)
	}
	return string(buf[:n]), true
}

// drain returns every datagram already queued, without waiting.
func (s *notifySocket) drain() []string {
	s.t.Helper()
	var msgs []string
	for {
		msg, ok := s.recv(time.Millisecond)
		if !ok {
			return msgs
		}
		msgs = append(msgs, msg)
	}
}

func monotonicUsec(t *testing.T) int64 {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return ts.Nano() / 1000
}

func TestNoNotifySocketIsNoop(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "100000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	n := NewNotifier(slog.New(slog.DiscardHandler))
	for name, f := range map[string]func() error{
		"Ready": n.Ready, "Reloading": n.Reloading, "Stopping": n.Stopping,
		"Status": func() error { return n.Status("x") },
	} {
		if err := f(); err != nil {
			t.Errorf("%s without NOTIFY_SOCKET = %v, want nil", name, err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- n.RunWatchdog(t.Context(), func() bool { return true }) }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("RunWatchdog without NOTIFY_SOCKET = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("RunWatchdog without NOTIFY_SOCKET did not return at once")
	}
}

func TestMessages(t *testing.T) {
	sock := newNotifySocket(t)
	n := NewNotifier(nil)

	if err := n.Ready(); err != nil {
		t.Fatal(err)
	}
	if got := sock.next(10 * time.Second); got != "READY=1" {
		t.Errorf("Ready sent %q, want READY=1", got)
	}

	before := monotonicUsec(t)
	if err := n.Reloading(); err != nil {
		t.Fatal(err)
	}
	after := monotonicUsec(t)
	got := sock.next(10 * time.Second)
	lines := strings.Split(got, "\n")
	if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
		t.Fatalf("Reloading sent %q, want RELOADING=1\\nMONOTONIC_USEC=<n>", got)
	}
	usec, err := strconv.ParseInt(strings.TrimPrefix(lines[1], "MONOTONIC_USEC="), 10, 64)
	if err != nil || usec < before || usec > after {
		t.Errorf("MONOTONIC_USEC %q not within [%d, %d] (err %v)", lines[1], before, after, err)
	}

	if err := n.Stopping(); err != nil {
		t.Fatal(err)
	}
	if got := sock.next(10 * time.Second); got != "STOPPING=1" {
		t.Errorf("Stopping sent %q, want STOPPING=1", got)
	}

	if err := n.Status("2/3 upstreams healthy,\n12 connections\r\n"); err != nil {
		t.Fatal(err)
	}
	if got, want := sock.next(10*time.Second), "STATUS=2/3 upstreams healthy, 12 connections "; got != want {
		t.Errorf("Status sent %q, want %q", got, want)
	}
}

func TestSendErrorNamesSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing")
	t.Setenv("NOTIFY_SOCKET", path)
	err := NewNotifier(nil).Ready()
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "READY=1") {
		t.Fatalf("Ready to a missing socket = %v, want an error naming READY=1 and %s", err, path)
	}
}

// watchdogRun starts RunWatchdog with a health function the test controls and
// that reports each of its results on calls.
type watchdogRun struct {
	healthy atomic.Bool
	calls   chan bool
	done    chan error
	cancel  context.CancelFunc
}

func startWatchdog(t *testing.T, n *Notifier) *watchdogRun {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	w := &watchdogRun{calls: make(chan bool, 1024), done: make(chan error, 1), cancel: cancel}
	w.healthy.Store(true)
	go func() {
		w.done <- n.RunWatchdog(ctx, func() bool {
			ok := w.healthy.Load()
			w.calls <- ok
			return ok
		})
	}()
	t.Cleanup(func() { w.stop(t) })
	return w
}

// waitCalls waits until the health function has returned want n times.
func (w *watchdogRun) waitCalls(t *testing.T, want bool, n int) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for n > 0 {
		select {
		case got := <-w.calls:
			if got == want {
				n--
			}
		case <-deadline:
			t.Fatalf("health function not called %d more times returning %v within 30s", n, want)
		}
	}
}

func (w *watchdogRun) stop(t *testing.T) {
	t.Helper()
	w.cancel()
	select {
	case err := <-w.done:
		if err != nil {
			t.Errorf("RunWatchdog = %v, want nil after cancel", err)
		}
		w.done <- nil // later stops see it too
	case <-time.After(30 * time.Second):
		t.Fatal("RunWatchdog did not return after its context was cancelled")
	}
}

func TestWatchdogPingsWhileHealthyOnly(t *testing.T) {
	sock := newNotifySocket(t)
	const timeout = time.Second
	t.Setenv("WATCHDOG_USEC", strconv.Itoa(int(timeout/time.Microsecond)))
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	var logs bytes.Buffer
	w := startWatchdog(t, NewNotifier(slog.New(slog.NewTextHandler(&syncWriter{w: &logs}, nil))))

	// Healthy: WATCHDOG=1 at half the timeout. Single gaps as the reader
	// sees them jitter on a loaded machine (a late read, then a quick
	// one); the average over several pings does not.
	var stamps []time.Time
	for len(stamps) < 9 {
		if got := sock.next(30 * time.Second); got != "WATCHDOG=1" {
			t.Fatalf("watchdog sent %q, want WATCHDOG=1", got)
		}
		stamps = append(stamps, time.Now())
	}
	period := pingPeriod(timeout)
	avg := stamps[len(stamps)-1].Sub(stamps[0]) / time.Duration(len(stamps)-1)
	if avg < period/2 || avg >= timeout {
		t.Errorf("watchdog pings every %v on average, want about %v and below WatchdogSec %v", avg, period, timeout)
	}

	// Unhealthy: once the health function has said false, nothing is sent.
	w.healthy.Store(false)
	w.waitCalls(t, false, 1)
	sock.drain() // pings sent before the first false answer
	w.waitCalls(t, false, 3)
	if msgs := sock.drain(); len(msgs) != 0 {
		t.Fatalf("watchdog sent %q while unhealthy, want nothing", msgs)
	}

	// Healthy again: pings resume.
	w.healthy.Store(true)
	if got := sock.next(30 * time.Second); got != "WATCHDOG=1" {
		t.Fatalf("watchdog sent %q after recovery, want WATCHDOG=1", got)
	}
	w.stop(t)
	if !strings.Contains(logs.String(), "withholding systemd watchdog pings") {
		t.Errorf("no log line about withheld pings; logs:\n%s", logs.String())
	}
}

func TestWatchdogDisabled(t *testing.T) {
	newNotifySocket(t)
	for name, env := range map[string][2]string{
		"no WATCHDOG_USEC":   {"", ""},
		"other WATCHDOG_PID": {"100000", strconv.Itoa(os.Getpid() + 1)},
	} {
		t.Run(name, func(t *testing.T) {
			t.Setenv("WATCHDOG_USEC", env[0])
			t.Setenv("WATCHDOG_PID", env[1])
			done := make(chan error, 1)
			go func() { done <- NewNotifier(nil).RunWatchdog(t.Context(), func() bool { return true }) }()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("RunWatchdog = %v, want nil", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("RunWatchdog did not return at once with the watchdog disabled")
			}
		})
	}
}

func TestWatchdogInvalidUsec(t *testing.T) {
	newNotifySocket(t)
	t.Setenv("WATCHDOG_USEC", "soon")
	t.Setenv("WATCHDOG_PID", "")
	err := NewNotifier(nil).RunWatchdog(t.Context(), func() bool { return true })
	if err == nil || !strings.Contains(err.Error(), `WATCHDOG_USEC "soon"`) {
		t.Fatalf("RunWatchdog with WATCHDOG_USEC=soon = %v, want an error naming it", err)
	}
}

func TestPingPeriod(t *testing.T) {
	for timeout, want := range map[time.Duration]time.Duration{
		10 * time.Second:       5 * time.Second,
		3 * time.Second:        1500 * time.Millisecond,
		time.Microsecond:       time.Millisecond,
		400 * time.Millisecond: 200 * time.Millisecond,
	} {
		if got := pingPeriod(timeout); got != want {
			t.Errorf("pingPeriod(%v) = %v, want %v", timeout, got, want)
		}
	}
}

// syncWriter serialises writes to a buffer shared with a goroutine.
type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

package ratelog

import (
	"bytes"
	"context"
	"log/slog"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// clock is a manual clock for deterministic windows.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// sink collects the text lines a user would read.
type sink struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *sink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *sink) Lines() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	txt := strings.TrimRight(s.buf.String(), "\n")
	if txt == "" {
		return nil
	}
	return strings.Split(txt, "\n")
}

// newLogger returns a text logger without timestamps at level.
func newLogger(s *sink, level slog.Level, source bool) *slog.Logger {
	return slog.New(slog.NewTextHandler(s, &slog.HandlerOptions{
		Level:     level,
		AddSource: source,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
}

func expectLines(t *testing.T, s *sink, want ...string) {
	t.Helper()
	got := s.Lines()
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("log lines:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

var repeatedRE = regexp.MustCompile(` repeated=(\d+)`)

// account returns the number of events the lines stand for: a summary line
// stands for its repeated=N events, any other line for itself.
func account(t *testing.T, lines []string) int {
	t.Helper()
	n := 0
	for _, l := range lines {
		if m := repeatedRE.FindStringSubmatch(l); m != nil {
			k, err := strconv.Atoi(m[1])
			if err != nil {
				t.Fatal(err)
			}
			n += k
		} else {
			n++
		}
	}
	return n
}

func TestFirstEventThenSummary(t *testing.T) {
	var s sink
	c := newClock()
	l := New(newLogger(&s, slog.LevelInfo, false), 10*time.Second, c.Now)
	ctx := context.Background()
	const key = "refused 10.0.0.1:6443"

	l.Log(ctx, slog.LevelWarn, key, "upstream dial failed", "upstream", "10.0.0.1:6443", "err", "connection refused", "attempt", 1)
	for i := 2; i <= 5; i++ {
		c.Advance(time.Second)
		l.Log(ctx, slog.LevelWarn, key, "upstream dial failed", "upstream", "10.0.0.1:6443", "err", "connection refused", "attempt", i)
	}
	expectLines(t, &s,
		`level=WARN msg="upstream dial failed" upstream=10.0.0.1:6443 err="connection refused" attempt=1`)

	c.Advance(6 * time.Second) // 10 s after the first line: the window is over
	l.Log(ctx, slog.LevelWarn, key, "upstream dial failed", "upstream", "10.0.0.1:6443", "err", "connection refused", "attempt", 6)
	expectLines(t, &s,
		`level=WARN msg="upstream dial failed" upstream=10.0.0.1:6443 err="connection refused" attempt=1`,
		`level=WARN msg="upstream dial failed" upstream=10.0.0.1:6443 err="connection refused" attempt=5 repeated=4`,
		`level=WARN msg="upstream dial failed" upstream=10.0.0.1:6443 err="connection refused" attempt=6`)

	// A quiet window, then an event: logged at once, no summary.
	c.Advance(time.Minute)
	l.Log(ctx, slog.LevelWarn, key, "upstream dial failed", "upstream", "10.0.0.1:6443", "err", "connection refused", "attempt", 7)
	if got := len(s.Lines()); got != 4 {
		t.Fatalf("lines = %d, want 4:\n%s", got, strings.Join(s.Lines(), "\n"))
	}
}

func TestKeysAreIndependent(t *testing.T) {
	var s sink
	c := newClock()
	l := New(newLogger(&s, slog.LevelInfo, false), time.Minute, c.Now)
	ctx := context.Background()
	l.Log(ctx, slog.LevelWarn, "a", "dial failed", "upstream", "a:6443")
	l.Log(ctx, slog.LevelWarn, "b", "dial failed", "upstream", "b:6443")
	l.Log(ctx, slog.LevelWarn, "a", "dial failed", "upstream", "a:6443")
	l.Log(ctx, slog.LevelWarn, "b", "dial failed", "upstream", "b:6443")
	l.Log(ctx, slog.LevelWarn, "b", "dial failed", "upstream", "b:6443")
	expectLines(t, &s,
		`level=WARN msg="dial failed" upstream=a:6443`,
		`level=WARN msg="dial failed" upstream=b:6443`)
	l.Flush()
	lines := s.Lines()
	if len(lines) != 4 {
		t.Fatalf("after Flush: %d lines, want 4:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	// Map order is random; compare as a set.
	got := map[string]bool{lines[2]: true, lines[3]: true}
	for _, w := range []string{
		`level=WARN msg="dial failed" upstream=a:6443 repeated=1`,
		`level=WARN msg="dial failed" upstream=b:6443 repeated=2`,
	} {
		if !got[w] {
			t.Errorf("missing summary %q in\n%s", w, strings.Join(lines, "\n"))
		}
	}
	// Nothing held back: Flush writes nothing.
	l.Flush()
	if n := len(s.Lines()); n != 4 {
		t.Errorf("empty Flush wrote lines: %d", n)
	}
}

// TestFloodIsBounded sends 1,000 identical failures a second for a minute of
// (simulated) time, with Run's periodic flush, and checks that a reader sees
// a handful of lines that still account for every event.
func TestFloodIsBounded(t *testing.T) {
	var s sink
	c := newClock()
	const window = 10 * time.Second
	l := New(newLogger(&s, slog.LevelInfo, false), window, c.Now)
	ctx := context.Background()
	const perSecond, seconds = 1000, 60
	for sec := range seconds {
		for range perSecond {
			l.Log(ctx, slog.LevelWarn, "refused", "upstream dial failed", "upstream", "10.0.0.9:6443", "err", "connection refused")
			c.Advance(time.Second / perSecond)
		}
		if sec%int(window/time.Second) == 0 {
			l.flush(true) // what Run does on its ticker
		}
	}
	l.Flush()
	lines := s.Lines()
	maxLines := 1 + 2*seconds/int(window/time.Second) + 1
	if len(lines) > maxLines {
		t.Errorf("%d events produced %d lines, want at most %d", perSecond*seconds, len(lines), maxLines)
	}
	if got := account(t, lines); got != perSecond*seconds {
		t.Errorf("lines account for %d events, want %d:\n%s", got, perSecond*seconds, strings.Join(lines, "\n"))
	}
	t.Logf("%d events -> %d lines", perSecond*seconds, len(lines))
}

func TestRunFlushesAndForgets(t *testing.T) {
	var s sink
	l := New(newLogger(&s, slog.LevelInfo, false), 20*time.Millisecond, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	const events = 50
	for range events {
		l.Log(ctx, slog.LevelWarn, "k", "probe failed", "upstream", "10.0.0.1:6443")
	}
	// Run reports the held-back events without any further Log call, then
	// forgets the idle key.
	deadline := time.Now().Add(30 * time.Second)
	for {
		l.mu.Lock()
		idle := len(l.entries) == 0
		l.mu.Unlock()
		if account(t, s.Lines()) == events && idle {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Run did not report all events and forget the key; lines:\n%s", strings.Join(s.Lines(), "\n"))
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not synchronisation
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
}

func TestRunFlushesOnStop(t *testing.T) {
	var s sink
	l := New(newLogger(&s, slog.LevelInfo, false), time.Hour, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	for range 3 {
		l.Log(ctx, slog.LevelError, "k", "config reload failed", "err", "bad port")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	expectLines(t, &s,
		`level=ERROR msg="config reload failed" err="bad port"`,
		`level=ERROR msg="config reload failed" err="bad port" repeated=2`)
}

func TestDisabledLevelCostsNothing(t *testing.T) {
	var s sink
	l := New(newLogger(&s, slog.LevelInfo, false), time.Minute, newClock().Now)
	for range 100 {
		l.Log(context.Background(), slog.LevelDebug, "conn", "connection closed")
	}
	l.Flush()
	if n := len(s.Lines()); n != 0 {
		t.Errorf("debug events at info level wrote %d lines", n)
	}
	if n := len(l.entries); n != 0 {
		t.Errorf("debug events at info level kept %d keys", n)
	}
}

func TestZeroWindowLogsEverything(t *testing.T) {
	var s sink
	l := New(newLogger(&s, slog.LevelInfo, false), 0, newClock().Now)
	for range 5 {
		l.Log(context.Background(), slog.LevelInfo, "k", "hello")
	}
	if n := len(s.Lines()); n != 5 {
		t.Errorf("lines = %d, want 5", n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Run(ctx); err != nil {
		t.Errorf("Run: %v", err)
	}
}

func TestSourceIsTheCaller(t *testing.T) {
	var s sink
	l := New(newLogger(&s, slog.LevelInfo, true), time.Minute, newClock().Now)
	l.Log(context.Background(), slog.LevelInfo, "k", "hello")
	lines := s.Lines()
	if len(lines) != 1 || !strings.Contains(lines[0], "ratelog_test.go:") {
		t.Errorf("source does not name the caller: %q", lines)
	}
}

func TestConcurrentAccounting(t *testing.T) {
	var s sink
	c := newClock()
	l := New(newLogger(&s, slog.LevelInfo, false), time.Second, c.Now)
	ctx := context.Background()
	const workers, each = 8, 2000
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				l.Log(ctx, slog.LevelWarn, "k"+strconv.Itoa(w%2), "dial failed")
				if i%100 == 0 {
					c.Advance(300 * time.Millisecond)
				}
				if i%500 == 0 {
					l.flush(true)
				}
			}
		}()
	}
	wg.Wait()
	l.Flush()
	lines := s.Lines()
	if got := account(t, lines); got != workers*each {
		t.Errorf("lines account for %d events, want %d", got, workers*each)
	}
	t.Logf("%d events -> %d lines", workers*each, len(lines))
}

func TestNilLoggerDiscards(t *testing.T) {
	l := New(nil, time.Second, nil)
	l.Log(context.Background(), slog.LevelError, "k", "nobody hears this")
	l.Flush()
}

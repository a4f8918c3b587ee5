// Package ratelog keeps bursts of identical log events from flooding the
// log. The first event of a key is logged at once; repeats within the
// window are only counted, and one summary line with repeated=N says how
// many were held back, in the manner of syslog's "last message repeated N
// times". A dead upstream refused a thousand times a second thus costs one
// line per window, not a thousand.
package ratelog

import (
	"context"
	"log/slog"
	"runtime"
	"sync"
	"time"
)

// RepeatedKey is the attribute of a summary line: how many events of the
// same key were held back since the previous line of that key.
const RepeatedKey = "repeated"

// Limiter rate-limits log events by key. Create it with New; it is safe for
// concurrent use.
type Limiter struct {
	logger *slog.Logger
	window time.Duration
	now    func() time.Time

	mu      sync.Mutex
	entries map[string]*entry
}

// entry is the state of one key.
type entry struct {
	// start is when the current window began (the last line of the key).
	start time.Time
	// held counts events held back in the current window; level, msg and
	// args are those of the last of them.
	held  int
	level slog.Level
	msg   string
	args  []any
}

// New returns a Limiter that logs to logger, lets one event per key through
// per window, and reads the time from now (time.Now if nil). A window <= 0
// disables limiting: every event is logged. A nil logger discards.
func New(logger *slog.Logger, window time.Duration, now func() time.Time) *Limiter {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if now == nil {
		now = time.Now
	}
	return &Limiter{logger: logger, window: window, now: now, entries: make(map[string]*entry)}
}

// Log logs msg with args at level unless an event with the same key was
// logged less than a window ago; then the event is counted and reported
// later in a summary line (by the first event after the window, by Run, or
// by Flush). key identifies "the same event", e.g. "dial refused "+addr;
// events of different keys never hold each other back.
func (l *Limiter) Log(ctx context.Context, level slog.Level, key, msg string, args ...any) {
	if !l.logger.Enabled(ctx, level) {
		return
	}
	var pcs [1]uintptr
	runtime.Callers(2, pcs[:]) // the caller of Log, for AddSource handlers
	now := l.now()
	if l.window <= 0 {
		l.emit(ctx, now, level, pcs[0], msg, args, 0)
		return
	}

	l.mu.Lock()
	e, ok := l.entries[key]
	var held int
	var hLevel slog.Level
	var hMsg string
	var hArgs []any
	switch {
	case !ok:
		l.entries[key] = &entry{start: now}
	case now.Sub(e.start) < l.window:
		e.held++
		e.level, e.msg, e.args = level, msg, args
		l.mu.Unlock()
		return
	default:
		// The window is over: report what it held back, then this event
		// opens a new window.
		held, hLevel, hMsg, hArgs = e.held, e.level, e.msg, e.args
		e.held, e.args, e.start = 0, nil, now
	}
	l.mu.Unlock()
	if held > 0 {
		l.emit(ctx, now, hLevel, 0, hMsg, hArgs, held)
	}
	l.emit(ctx, now, level, pcs[0], msg, args, 0)
}

// Flush logs one summary line for every key with held-back events and
// starts a new window for it. Call it at shutdown so no count is lost.
func (l *Limiter) Flush() {
	l.flush(false)
}

// Run flushes expired windows once per window until ctx is done, then
// flushes everything and returns nil. With Run, a continuous flood costs
// one summary line per key and window even when no later event arrives.
func (l *Limiter) Run(ctx context.Context) error {
	if l.window <= 0 {
		<-ctx.Done()
		return nil
	}
	t := time.NewTicker(l.window)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			l.Flush()
			return nil
		case <-t.C:
			l.flush(true)
		}
	}
}

// summary is one line owed by flush.
type summary struct {
	level slog.Level
	msg   string
	args  []any
	held  int
}

// flush reports held-back events: of every key, or with expiredOnly only
// of keys whose window is over. Keys whose window is over and that held
// nothing back are forgotten, so the map does not grow without bound.
func (l *Limiter) flush(expiredOnly bool) {
	now := l.now()
	var out []summary
	l.mu.Lock()
	for k, e := range l.entries {
		expired := now.Sub(e.start) >= l.window
		if expiredOnly && !expired {
			continue
		}
		if e.held == 0 {
			if expired {
				delete(l.entries, k)
			}
			continue
		}
		out = append(out, summary{level: e.level, msg: e.msg, args: e.args, held: e.held})
		e.held, e.args, e.start = 0, nil, now
	}
	l.mu.Unlock()
	for _, s := range out {
		l.emit(context.Background(), now, s.level, 0, s.msg, s.args, s.held)
	}
}

// emit writes one record; held > 0 adds repeated=held.
func (l *Limiter) emit(ctx context.Context, now time.Time, level slog.Level, pc uintptr, msg string, args []any, held int) {
	h := l.logger.Handler()
	if !h.Enabled(ctx, level) {
		return
	}
	r := slog.NewRecord(now, level, msg, pc)
	r.Add(args...)
	if held > 0 {
		r.AddAttrs(slog.Int(RepeatedKey, held))
	}
	_ = h.Handle(ctx, r) // a failing log handler has nowhere to report to
}

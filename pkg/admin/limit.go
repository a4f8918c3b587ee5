package admin

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// connLimiter caps the connections the admin server holds at once, and
// cuts a connection whose request header grows past headerCut before the
// HTTP server would hold it for an answer.
//
// When a connection arrives at the cap, one that is not running a handler
// is closed to make room, in this order: the oldest that has sent more
// than heavyBytes of a request without getting it to a handler (a header
// far larger than any real client's), then the longest idle between
// keep-alive requests, then the oldest of the rest that has been connected
// for evictAfter without a request (it sends nothing, or its header
// slowly). If there is none, the newcomer waits up to queueWait for a
// place and is closed if none frees up.
//
// So the server never holds more than max connections, however many a
// caller opens, and a caller that floods it with large, slow or idle
// connections cannot shut out kubelet's probes: a probe sends a short
// request at once and is in its handler well within evictAfter, while the
// flood's connections are the first to go. A header that is too large is
// answered 431 and the connection closed at once (the HTTP server's own
// path for it lingers half a second per connection, which a flood would
// turn into memory).
//
// The zero value is not usable; see newConnLimiter.
type connLimiter struct {
	net.Listener
	max int
	now func() time.Time

	mu    sync.Mutex
	conns map[*limitedConn]struct{}
	// changed is closed (and replaced) when a place may have freed up.
	changed chan struct{}
	// shed counts connections closed because of the cap.
	shed uint64
}

const (
	// heavyBytes is how much of a request a connection may send before
	// it is the first to make room: real clients' requests to the admin
	// port are a few hundred bytes.
	heavyBytes = 2 << 10
	// headerCut is how much a connection may send outside a handler
	// (request line and header) before it is answered 431 and closed.
	headerCut = MaxHeaderBytes + 1<<10
	// evictAfter is how long a connection may take to send its request
	// before a newcomer at the cap may take its place.
	evictAfter = 250 * time.Millisecond
	// queueWait is how long a newcomer at the cap waits for a place.
	queueWait = time.Second
)

// tooLarge is written to a connection cut at headerCut.
const tooLarge = "HTTP/1.1 431 Request Header Fields Too Large\r\n" +
	"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: 36\r\n\r\n" +
	"431 Request Header Fields Too Large\n"

// errHeaderCut is the read error of a connection cut at headerCut. It is
// a read *net.OpError, which the HTTP server closes without answering.
var errHeaderCut = &net.OpError{Op: "read", Net: "tcp", Err: errors.New("request header too large")}

// limitedConn is a connection held by a connLimiter. Its fields other
// than Conn, l and read are guarded by l.mu.
type limitedConn struct {
	net.Conn
	l *connLimiter
	// read counts the bytes read since the last handler ended.
	read atomic.Int64
	// serving is true while a handler runs.
	serving atomic.Bool
	cut     atomic.Bool
	// since is when it was accepted, last became idle, or last finished
	// a handler.
	since time.Time
	idle  bool
	once  sync.Once
}

func newConnLimiter(ln net.Listener, max int, now func() time.Time) *connLimiter {
	return &connLimiter{Listener: ln, max: max, now: now, conns: make(map[*limitedConn]struct{}, max),
		changed: make(chan struct{})}
}

// Accept returns the next connection, after making room for it under the
// cap. A connection that cannot be given room is closed, and Accept waits
// for the next one.
func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if lc := l.place(c); lc != nil {
			return lc, nil
		}
		_ = c.Close()
	}
}

// place finds room for c and returns it held, or nil when every held
// connection stayed in a handler for queueWait.
func (l *connLimiter) place(c net.Conn) *limitedConn {
	lc := &limitedConn{Conn: c, l: l}
	var deadline <-chan time.Time
	for {
		victim, ok, changed := l.admit(lc)
		if victim != nil {
			_ = victim.Close()
		}
		if ok {
			return lc
		}
		if deadline == nil {
			t := time.NewTimer(queueWait)
			defer t.Stop()
			deadline = t.C
		}
		// A silent connection becomes evictable as it ages: look again
		// then at the latest.
		age := time.NewTimer(evictAfter / 5)
		select {
		case <-changed:
		case <-age.C:
		case <-deadline:
			age.Stop()
			l.mu.Lock()
			l.shed++
			l.mu.Unlock()
			return nil
		}
		age.Stop()
	}
}

// admit adds lc if there is room or a connection to evict (returned, to be
// closed outside the lock). When it cannot, it returns a channel closed at
// the next change.
func (l *connLimiter) admit(lc *limitedConn) (victim *limitedConn, ok bool, changed <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.conns) >= l.max {
		victim = l.evictable()
		if victim == nil {
			return nil, false, l.changed
		}
		// Forget it now, so the count stays at max even before its Close
		// runs.
		delete(l.conns, victim)
		l.shed++
	}
	lc.since = l.now()
	l.conns[lc] = struct{}{}
	return victim, true, nil
}

// notify wakes the newcomers waiting for a place. Called with l.mu held.
func (l *connLimiter) notify() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// evictable returns the connection to close first (see connLimiter), or
// nil when every one is running a handler. Called with l.mu held.
func (l *connLimiter) evictable() *limitedConn {
	var heavy, idle, other *limitedConn
	now := l.now()
	older := func(c, than *limitedConn) bool { return than == nil || c.since.Before(than.since) }
	for c := range l.conns {
		switch {
		case c.serving.Load():
		case c.read.Load() > heavyBytes:
			if older(c, heavy) {
				heavy = c
			}
		case c.idle:
			if older(c, idle) {
				idle = c
			}
		case now.Sub(c.since) >= evictAfter:
			if older(c, other) {
				other = c
			}
		}
	}
	switch {
	case heavy != nil:
		return heavy
	case idle != nil:
		return idle
	}
	return other
}

// connKey is the context key under which ConnContext stores the
// connection.
type connKey struct{}

// connContext is the http.Server ConnContext hook: it makes the
// connection known to the handler wrapper.
func (l *connLimiter) connContext(ctx context.Context, c net.Conn) context.Context {
	if lc, ok := c.(*limitedConn); ok {
		return context.WithValue(ctx, connKey{}, lc)
	}
	return ctx
}

// wrap marks the request's connection as serving while h runs, so it is
// never evicted in the middle of an answer.
func (l *connLimiter) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		lc, ok := r.Context().Value(connKey{}).(*limitedConn)
		if ok {
			l.mu.Lock()
			lc.serving.Store(true)
			lc.idle = false
			l.mu.Unlock()
			defer func() {
				l.mu.Lock()
				lc.serving.Store(false)
				lc.since = l.now()
				lc.read.Store(0)
				l.notify()
				l.mu.Unlock()
			}()
		}
		h.ServeHTTP(w, r)
	})
}

// connState is the http.Server ConnState hook: it records which held
// connections are idle, and forgets closed ones.
func (l *connLimiter) connState(c net.Conn, s http.ConnState) {
	lc, ok := c.(*limitedConn)
	if !ok {
		return
	}
	switch s {
	case http.StateClosed, http.StateHijacked:
		l.forget(lc)
		return
	}
	l.mu.Lock()
	lc.idle = s == http.StateIdle
	if lc.idle {
		lc.since = l.now()
	}
	l.mu.Unlock()
}

func (l *connLimiter) forget(lc *limitedConn) {
	l.mu.Lock()
	if _, ok := l.conns[lc]; ok {
		delete(l.conns, lc)
		l.notify()
	}
	l.mu.Unlock()
}

// held returns the number of connections held, how many of them are
// sending an oversized request, and the number shed so far.
func (l *connLimiter) held() (n, heavy int, shed uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for c := range l.conns {
		if !c.serving.Load() && c.read.Load() > heavyBytes {
			heavy++
		}
	}
	return len(l.conns), heavy, l.shed
}

// Read counts what the connection sends, for evictable, and cuts a
// request header that grows past headerCut: it answers 431 itself and
// reports a read error, on which the HTTP server closes at once.
func (c *limitedConn) Read(p []byte) (int, error) {
	if c.cut.Load() {
		return 0, errHeaderCut
	}
	if !c.serving.Load() {
		if left := headerCut - c.read.Load(); left <= 0 {
			c.cut.Store(true)
			_ = c.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = io.WriteString(c.Conn, tooLarge)
			return 0, errHeaderCut
		} else if int64(len(p)) > left {
			p = p[:left]
		}
	}
	n, err := c.Conn.Read(p)
	c.read.Add(int64(n))
	return n, err
}

// CloseWrite half-closes the connection when it can, as the HTTP server
// does before closing a connection whose request it did not read whole.
func (c *limitedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Close closes the connection and releases its place under the cap.
func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.forget(c) })
	return err
}

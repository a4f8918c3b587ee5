// Package proxy accepts client connections and forwards their raw TCP
// streams to upstreams picked from an upstream.Set.
//
// A Server owns its accept loops (one per listener given to Serve), one
// goroutine pair per proxied connection, and the optional rebalancer; Run
// stops and waits for all of them. A failed connect marks the upstream down
// and the same client connection is tried on the next upstream. Until an
// upstream has sent its first byte, a client's TLS handshake is kept and may
// be replayed to another upstream (see replay.go); after that the bytes flow
// through io.Copy between *net.TCPConn values, which the kernel splices.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/extractedprism/extractedprism/pkg/ratelog"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// DialFunc connects to an upstream address.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Observer receives events for metrics. All methods must be cheap and safe
// for concurrent use. Per-upstream methods get the upstream itself so the
// implementation can resolve its per-upstream collectors once (for example
// through Upstream.Attachment) instead of by label on every call.
type Observer interface {
	Accepted()
	// Failover: a client connection needed another upstream than the
	// first one tried (counted once per connection).
	Failover()
	Replayed()
	NoUpstream()
	ClosedOnDown(n int)
	DrainCut(n int)
	Rebalanced()
	DialDuration(d time.Duration)
	ConnOpened(u *upstream.Upstream)
	ConnClosed(u *upstream.Upstream, sent, received int64)
	DialFailed(u *upstream.Upstream, reason string)
}

// Options configure a Server. Zero values get the defaults documented per
// field.
type Options struct {
	// Set supplies upstreams (required).
	Set *upstream.Set
	// Dial connects to upstreams (default: net.Dialer with KeepAlive and
	// UserTimeout applied).
	Dial DialFunc
	// DialTimeout bounds one connect attempt (default 1s).
	DialTimeout time.Duration
	// KeepAlive is the TCP keepalive idle time on both legs (0 = off).
	KeepAlive time.Duration
	// UserTimeout is TCP_USER_TIMEOUT on both legs (0 = kernel default).
	UserTimeout time.Duration
	// DrainTimeout is how long established connections may go on after
	// shutdown starts (default 30s; negative = cut at once).
	DrainTimeout time.Duration
	// Replay enables handshake replay before the first upstream byte.
	Replay bool
	// FirstByteTimeout is how long an upstream may stay silent after the
	// client's first bytes before the handshake is replayed elsewhere
	// (0 = no limit). Only used with Replay.
	FirstByteTimeout time.Duration
	// ReplayBufferBytes bounds the kept handshake (default 16 KiB).
	ReplayBufferBytes int
	// Rebalance configures closing surplus connections after a recovery.
	Rebalance RebalanceOptions
	// Observer receives metrics events (default: none).
	Observer Observer
	// Logger logs; per-connection lines are at debug level only.
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
}

func (o Options) withDefaults() Options {
	if o.DialTimeout <= 0 {
		o.DialTimeout = time.Second
	}
	if o.DrainTimeout == 0 {
		o.DrainTimeout = 30 * time.Second
	}
	if o.ReplayBufferBytes <= 0 {
		o.ReplayBufferBytes = 16 << 10
	}
	if o.Observer == nil {
		o.Observer = nopObserver{}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Dial == nil {
		ka, ut := o.KeepAlive, o.UserTimeout
		d := &net.Dialer{
			KeepAlive: -1,
			Control: func(_, _ string, rc syscall.RawConn) error {
				return setUserTimeout(rc, ut)
			},
		}
		if ka > 0 {
			d.KeepAliveConfig = net.KeepAliveConfig{Enable: true, Idle: ka, Interval: ka / 3, Count: 3}
		}
		o.Dial = d.DialContext
	}
	return o
}

// Server is the TCP proxy. Create it with New.
type Server struct {
	opts atomic.Pointer[Options]
	set  *upstream.Set

	mu        sync.Mutex
	listeners map[net.Listener]*acceptLoop
	conns     map[*conn]struct{}
	shutdown  bool
	idle      chan struct{} // closed and replaced when conns becomes empty

	// rlog logs bursts of identical failures once per window with a count.
	rlog *ratelog.Limiter

	active    atomic.Int64
	acceptErr atomic.Pointer[acceptFailure]
	loopDied  atomic.Bool
	wg        sync.WaitGroup // accept loops and connection handlers
}

// acceptFailure is the last accept error and when it happened.
type acceptFailure struct {
	err error
	at  time.Time
}

// acceptErrorFresh is how long an accept error counts as current. While
// accepts fail the loop retries at least once a second and renews it; once
// descriptors are free again Accept blocks waiting for a client, so an
// older error is stale.
const acceptErrorFresh = 2500 * time.Millisecond

type acceptLoop struct {
	ln      net.Listener
	stopped atomic.Bool
	stop    chan struct{}
}

// New returns a Server. Call Serve to add listeners and Run to operate it.
func New(o Options) *Server {
	s := &Server{
		set:       o.Set,
		listeners: map[net.Listener]*acceptLoop{},
		conns:     map[*conn]struct{}{},
	}
	o = o.withDefaults()
	s.opts.Store(&o)
	s.rlog = ratelog.New(o.Logger, 10*time.Second, nil)
	return s
}

// SetOptions replaces the options used by new connections (configuration
// reload). The upstream Set cannot change.
func (s *Server) SetOptions(o Options) {
	o.Set = s.set
	o = o.withDefaults()
	s.opts.Store(&o)
}

// ErrShutdown is returned by Serve after shutdown has begun.
var ErrShutdown = errors.New("proxy is shutting down")

// Serve starts accepting on ln. The Server owns ln from now on: it closes
// it on StopListener or shutdown.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shutdown {
		return ErrShutdown
	}
	al := &acceptLoop{ln: ln, stop: make(chan struct{})}
	s.listeners[ln] = al
	s.wg.Add(1)
	go s.acceptLoop(al)
	return nil
}

// StopListener closes ln: the kernel refuses new connects there, while the
// connections it accepted go on.
func (s *Server) StopListener(ln net.Listener) {
	s.mu.Lock()
	al := s.listeners[ln]
	delete(s.listeners, ln)
	s.mu.Unlock()
	if al != nil {
		al.close()
	}
}

func (al *acceptLoop) close() {
	if al.stopped.CompareAndSwap(false, true) {
		close(al.stop)
		_ = al.ln.Close()
	}
}

// Listening reports whether at least one accept loop is serving.
func (s *Server) Listening() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.listeners) > 0 && !s.shutdown
}

// Alive reports whether no accept loop has died unexpectedly.
func (s *Server) Alive() bool { return !s.loopDied.Load() }

// AcceptError returns the error of the last accept if it failed and no
// accept has succeeded since (e.g. too many open files), or nil.
func (s *Server) AcceptError() error {
	if p := s.acceptErr.Load(); p != nil && time.Since(p.at) < acceptErrorFresh {
		return p.err
	}
	return nil
}

// Active returns the number of client connections being proxied.
func (s *Server) Active() int64 { return s.active.Load() }

// Run operates the server until ctx is done, then shuts down: listeners
// close, established connections get DrainTimeout to finish and are then
// cut. Run returns after every goroutine the Server started has ended.
func (s *Server) Run(ctx context.Context) error {
	rbCtx, rbCancel := context.WithCancel(context.Background())
	rbDone := make(chan struct{}, 2)
	go func() {
		defer func() { rbDone <- struct{}{} }()
		s.rebalanceLoop(rbCtx)
	}()
	go func() {
		defer func() { rbDone <- struct{}{} }()
		_ = s.rlog.Run(rbCtx)
	}()
	<-ctx.Done()
	s.drain()
	s.wg.Wait()
	rbCancel()
	<-rbDone
	<-rbDone
	return nil
}

// drain closes the listeners and waits for connections up to DrainTimeout.
func (s *Server) drain() {
	o := s.opts.Load()
	s.mu.Lock()
	s.shutdown = true
	loops := make([]*acceptLoop, 0, len(s.listeners))
	for ln, al := range s.listeners {
		loops = append(loops, al)
		delete(s.listeners, ln)
	}
	s.mu.Unlock()
	for _, al := range loops {
		al.close()
	}
	if n := s.active.Load(); n > 0 {
		o.Logger.Info("draining connections", "connections", n, "timeout", o.DrainTimeout)
	}
	if o.DrainTimeout > 0 {
		t := time.NewTimer(o.DrainTimeout)
		defer t.Stop()
		for {
			idle := s.idleChan()
			if idle == nil {
				return
			}
			select {
			case <-idle:
				continue
			case <-t.C:
			}
			break
		}
	}
	cut := s.closeConns(func(*conn) bool { return true }, reasonDrain)
	if cut > 0 {
		o.Observer.DrainCut(cut)
		o.Logger.Info("drain timeout reached, connections cut", "connections", cut)
	}
}

// idleChan returns a channel closed when no connection is tracked, or nil
// if none is tracked now.
func (s *Server) idleChan() chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.conns) == 0 {
		return nil
	}
	if s.idle == nil {
		s.idle = make(chan struct{})
	}
	return s.idle
}

// UpstreamDown closes every connection riding on u. The daemon calls it
// when a probe marks u down and close_on_down is set, so long-lived
// watches reconnect to a healthy apiserver instead of hanging. A
// connection still waiting for u's first byte loses only its upstream leg:
// its handshake is replayed to another upstream.
func (s *Server) UpstreamDown(u *upstream.Upstream) int {
	s.mu.Lock()
	var waiting []*conn
	for c := range s.conns {
		if c.upstream() == u && c.replaying.Load() {
			waiting = append(waiting, c)
		}
	}
	s.mu.Unlock()
	for _, c := range waiting {
		c.closeUpstreamLeg()
	}
	n := s.closeConns(func(c *conn) bool { return c.upstream() == u && !c.replaying.Load() }, reasonDown)
	if n > 0 {
		o := s.opts.Load()
		o.Observer.ClosedOnDown(n)
		o.Logger.Info("closed connections of a down upstream", "upstream", u.Addr(), "connections", n)
	}
	return n
}

func (s *Server) closeConns(match func(*conn) bool, reason string) int {
	s.mu.Lock()
	var victims []*conn
	for c := range s.conns {
		if match(c) {
			victims = append(victims, c)
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		c.kill(reason)
	}
	return len(victims)
}

func (s *Server) track(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conns[c] = struct{}{}
	s.active.Add(1)
}

func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
	s.active.Add(-1)
	if len(s.conns) == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
}

// acceptLoop accepts until its listener is closed. Temporary failures
// (EMFILE, ENFILE, ENOBUFS, ECONNABORTED, ...) back off from 5 ms to 1 s
// and retry, as net/http's Serve does; pending connects wait in the
// kernel's backlog meanwhile.
func (s *Server) acceptLoop(al *acceptLoop) {
	defer s.wg.Done()
	var delay time.Duration
	for {
		c, err := al.ln.Accept()
		if err != nil {
			if al.stopped.Load() {
				return
			}
			if errors.Is(err, net.ErrClosed) {
				s.loopDied.Store(true)
				s.opts.Load().Logger.Error("accept loop stopped: listener closed unexpectedly", "listener", al.ln.Addr().String(), "err", err)
				return
			}
			s.acceptErr.Store(&acceptFailure{err: err, at: time.Now()})
			if delay == 0 {
				delay = 5 * time.Millisecond
			} else {
				delay = min(2*delay, time.Second)
			}
			s.logAcceptError(err, delay)
			t := time.NewTimer(delay)
			select {
			case <-al.stop:
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		if delay != 0 {
			s.opts.Load().Logger.Info("accepting again", "listener", al.ln.Addr().String())
			delay = 0
		}
		if s.acceptErr.Load() != nil {
			s.acceptErr.Store(nil)
		}
		s.wg.Add(1)
		go s.handle(c)
	}
}

// logAcceptError logs accept failures once per window with a count.
func (s *Server) logAcceptError(err error, delay time.Duration) {
	s.rlog.Log(context.Background(), slog.LevelWarn, "accept", "accept failed, retrying", "err", err, "retry_in", delay)
}

const (
	reasonDrain     = "drain timeout"
	reasonDown      = "upstream down"
	reasonRebalance = "rebalance"
)

// conn is one proxied client connection.
type conn struct {
	client net.Conn
	start  time.Time

	// replaying is true until the upstream's first byte (replay phase).
	replaying atomic.Bool

	mu     sync.Mutex
	up     net.Conn
	u      *upstream.Upstream
	killed string
}

// closeUpstreamLeg closes the upstream side only; the replay path then
// moves the client to another upstream.
func (c *conn) closeUpstreamLeg() {
	c.mu.Lock()
	up := c.up
	c.mu.Unlock()
	if up != nil {
		_ = up.Close()
	}
}

func (c *conn) upstream() *upstream.Upstream {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.u
}

func (c *conn) setUpstream(u *upstream.Upstream, up net.Conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.u, c.up = u, up
	return c.killed == ""
}

// kill closes both legs; the copy goroutines then end.
func (c *conn) kill(reason string) {
	c.mu.Lock()
	if c.killed == "" {
		c.killed = reason
	}
	up := c.up
	c.mu.Unlock()
	_ = c.client.Close()
	if up != nil {
		_ = up.Close()
	}
}

func (c *conn) killReason() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.killed
}

func (s *Server) handle(client net.Conn) {
	defer s.wg.Done()
	o := s.opts.Load()
	o.Observer.Accepted()
	c := &conn{client: client, start: o.Now()}
	s.track(c)
	defer s.untrack(c)
	defer func() { _ = client.Close() }()
	tuneConn(client, o)

	tried := make(map[*upstream.Upstream]bool, 4)
	up, u, err := s.dialNext(o, tried)
	if err != nil {
		o.Observer.NoUpstream()
		s.rlog.Log(context.Background(), slog.LevelWarn, "no-upstream", "client connection closed: no upstream reachable", "reason", err)
		return
	}
	if !c.setUpstream(u, up) {
		_ = up.Close()
		return
	}
	if len(tried) > 1 {
		o.Observer.Failover() // once per connection, however many tries
	}
	if o.Replay {
		s.pipeReplay(o, c, up, u, tried)
		return
	}
	u.Acquire()
	o.Observer.ConnOpened(u)
	sent, recv := pipe(client, up)
	u.Release()
	o.Observer.ConnClosed(u, sent, recv)
	o.Logger.Debug("connection closed", "client", client.RemoteAddr().String(), "upstream", u.Addr(),
		"sent", sent, "received", recv, "reason", c.killReason())
}

var errNoUpstream = errors.New("no upstream reachable")

// dialNext dials upstreams not tried yet, healthy ones first, until one
// answers. Each failure marks that upstream down at once.
// tried collects every upstream attempted for this client connection.
func (s *Server) dialNext(o *Options, tried map[*upstream.Upstream]bool) (net.Conn, *upstream.Upstream, error) {
	var errs []error
	for {
		u := s.set.Pick(func(x *upstream.Upstream) bool { return tried[x] })
		if u == nil {
			if len(errs) == 0 {
				return nil, nil, fmt.Errorf("%w: no upstream configured or all tried", errNoUpstream)
			}
			return nil, nil, fmt.Errorf("%w: %w", errNoUpstream, errors.Join(errs...))
		}
		tried[u] = true
		ctx, cancel := context.WithTimeout(context.Background(), o.DialTimeout)
		start := o.Now()
		up, err := o.Dial(ctx, "tcp", u.Addr())
		cancel()
		o.Observer.DialDuration(o.Now().Sub(start))
		if err == nil {
			tuneConn(up, o)
			return up, u, nil
		}
		if localExhaustion(err) {
			// Out of descriptors here: not the upstream's fault, and no
			// other upstream would do better.
			return nil, nil, fmt.Errorf("%w: %s: %w", errNoUpstream, u.Addr(), err)
		}
		reason := dialReason(err)
		o.Observer.DialFailed(u, reason)
		s.set.MarkDown(u, fmt.Sprintf("connect failed (%s): %v", reason, err))
		errs = append(errs, fmt.Errorf("%s: %w", u.Addr(), err))
	}
}

// localExhaustion reports errors that are this process's or host's
// shortage (descriptors, buffers), not the upstream's failure.
func localExhaustion(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

// dialReason classifies a connect error for metrics.
func dialReason(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT),
		errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return "other"
}

// tuneConn applies keepalive and TCP_USER_TIMEOUT to a TCP connection.
func tuneConn(c net.Conn, o *Options) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return
	}
	if o.KeepAlive > 0 {
		_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: o.KeepAlive, Interval: o.KeepAlive / 3, Count: 3})
	}
	if o.UserTimeout > 0 {
		if rc, err := tc.SyscallConn(); err == nil {
			_ = setUserTimeout(rc, o.UserTimeout)
		}
	}
}

type closeWriter interface{ CloseWrite() error }

// pipe copies both ways until both directions ended, forwarding
// half-close, and returns the bytes sent to and received from upstream.
func pipe(client, up net.Conn) (sent, received int64) {
	done := make(chan int64, 1)
	go copyClientToUpstream(up, client, done)
	received = copyHalf(client, up)
	sent = <-done
	_ = up.Close()
	return sent, received
}

// copyClientToUpstream is the client-to-upstream half of pipe.
func copyClientToUpstream(up, client net.Conn, done chan<- int64) {
	done <- copyHalf(up, client)
}

// copyHalf copies src to dst; on EOF it half-closes dst, on error it
// closes both so the other direction ends too.
func copyHalf(dst, src net.Conn) int64 {
	n, err := io.Copy(dst, src)
	if err == nil {
		if cw, ok := dst.(closeWriter); ok {
			if cw.CloseWrite() == nil {
				return n
			}
		}
	}
	_ = dst.Close()
	_ = src.Close()
	return n
}

type nopObserver struct{}

func (nopObserver) Accepted()                                   {}
func (nopObserver) Failover()                                   {}
func (nopObserver) Replayed()                                   {}
func (nopObserver) NoUpstream()                                 {}
func (nopObserver) ClosedOnDown(int)                            {}
func (nopObserver) DrainCut(int)                                {}
func (nopObserver) Rebalanced()                                 {}
func (nopObserver) DialDuration(time.Duration)                  {}
func (nopObserver) ConnOpened(*upstream.Upstream)               {}
func (nopObserver) ConnClosed(*upstream.Upstream, int64, int64) {}
func (nopObserver) DialFailed(*upstream.Upstream, string)       {}

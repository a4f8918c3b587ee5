// Package proxy accepts client connections and forwards their raw TCP
// streams to upstreams picked from an upstream.Set.
//
// A Server owns its accept loops (one per listener given to Serve), the
// event loops of its data path (relay), and the optional rebalancer; Run
// stops and waits for all of them. A connection goes through two phases:
//
//   - Connecting, in a goroutine of its own: the upstream is dialled; a
//     failed connect is reported to the upstream set as a passive failure
//     (a probe then decides whether the upstream is down) and the same
//     client connection is tried on the next upstream.
//   - Connected: both sockets are handed to the relay's event loops (see
//     relay_linux.go) and the goroutine ends. A connection costs a small
//     struct and no goroutine or buffer while idle. With replay, the
//     client's TLS handshake is kept until the upstream's first byte and
//     may be replayed to another upstream (see replay.go).
//
// Connections are tracked from the moment they are accepted, indexed by the
// upstream they ride on, so that closing one upstream's connections
// (CloseUpstream, rebalancing) touches only those, and so that shutdown
// never waits on a connection it has not cut. The Server never decides on
// its own to close connections of a down upstream: the health policy
// (package health) asks it to, through CloseUpstream.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
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
	// DialFailed: a connect to u failed, or u failed a connection before
	// its first byte (after the client had sent bytes).
	DialFailed(u *upstream.Upstream, kind failure.Kind)
}

// Options configure a Server. Zero values get the defaults documented per
// field.
type Options struct {
	// Set supplies upstreams (required).
	Set *upstream.Set
	// Dial connects to upstreams. Default: upstreams given as IP addresses
	// are connected from the event loops without blocking (see
	// connect_linux.go), others with a net.Dialer; both apply KeepAlive
	// and UserTimeout. A Dial given here is used for every upstream.
	Dial DialFunc
	// DialTimeout bounds one connect attempt (default 1s).
	DialTimeout time.Duration
	// KeepAlive is the TCP keepalive idle time on both legs (0 = off).
	KeepAlive time.Duration
	// UserTimeout is TCP_USER_TIMEOUT on both legs (0 = kernel default).
	UserTimeout time.Duration
	// DrainTimeout is how long connections may go on after shutdown
	// starts (default 30s; negative = cut at once). See drain for what
	// happens to new connections meanwhile.
	DrainTimeout time.Duration
	// Replay enables handshake replay before the first upstream byte.
	Replay bool
	// FirstByteTimeout is how long an upstream may stay silent after the
	// client's first bytes before the handshake is replayed to another
	// upstream that is up and answers its probes, if there is one (0 = no
	// limit). Only used with Replay.
	FirstByteTimeout time.Duration
	// ReplayBufferBytes bounds the kept handshake (default 16 KiB).
	ReplayBufferBytes int
	// SuccessorServes reports whether another listening socket than ln
	// serves ln's port (default: none is ever assumed). The daemon passes
	// OtherListener.
	SuccessorServes func(ln net.Listener) bool
	// Rebalance configures closing surplus connections after a recovery.
	Rebalance RebalanceOptions
	// Observer receives metrics events (default: none).
	Observer Observer
	// Logger logs; per-connection lines are at debug level only.
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time

	// dialTuned: Dial is the default dialer, which applies KeepAlive and
	// UserTimeout itself.
	dialTuned bool
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
		o.dialTuned = true
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
	// byUp indexes conns by the upstream they ride on (nil: connecting).
	byUp map[*upstream.Upstream]map[*conn]struct{}
	// draining: shutdown has begun; shutdown: no connection is accepted
	// any more.
	draining bool
	shutdown bool
	idle     chan struct{} // closed and replaced when conns becomes empty
	stopping chan struct{} // closed when draining begins

	// rlog logs bursts of identical failures once per window with a count.
	rlog *ratelog.Limiter

	// relay carries established connections; started at the first one.
	relayOnce sync.Once
	relay     *relay
	relayErr  error

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
	ln net.Listener
	// sock accepts on ln's socket without making a net.Conn of each
	// connection, which the relay would only take apart again.
	sock    *listenSocket
	stopped atomic.Bool
	stop    chan struct{}
	done    chan struct{} // closed when the loop has returned
}

// New returns a Server. Call Serve to add listeners and Run to operate it.
func New(o Options) *Server {
	s := &Server{
		set:       o.Set,
		listeners: map[net.Listener]*acceptLoop{},
		conns:     map[*conn]struct{}{},
		byUp:      map[*upstream.Upstream]map[*conn]struct{}{},
		stopping:  make(chan struct{}),
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
	if s.draining {
		return ErrShutdown
	}
	sock, err := newListenSocket(ln)
	if err != nil {
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	}
	al := &acceptLoop{ln: ln, sock: sock, stop: make(chan struct{}), done: make(chan struct{})}
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
		_ = al.sock.close()
	}
}

// Listening reports whether at least one accept loop is serving and
// shutdown has not begun.
func (s *Server) Listening() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.listeners) > 0 && !s.draining
}

// Accepting reports whether at least one accept loop is serving, draining
// or not.
func (s *Server) Accepting() bool {
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
	s.relayOnce.Do(func() {}) // no relay may start from now on
	if s.relay != nil {
		s.relay.stop()
	}
	rbCancel()
	<-rbDone
	<-rbDone
	return nil
}

// drain ends the Server's service. Established connections get up to
// DrainTimeout to finish and are then cut. New connections:
//
//   - when another listening socket serves the same port (a successor: a
//     surged DaemonSet pod, a new process that bound it with SO_REUSEPORT),
//     the listeners close at once and the kernel sends new connects there;
//   - otherwise nobody else would serve them (a static pod being replaced,
//     a lone process, systemd's restart, where the successor starts only
//     after this process exits): the listeners stay open and new
//     connections are served until the process is idle, a successor
//     appears, or shortly before DrainTimeout passes (lastCall: a
//     connection accepted at the last moment would only be cut; under
//     systemd the connects that come then wait in the shared socket for the
//     next process). Refusing them for the whole drain would stall every
//     client of the node for that long.
func (s *Server) drain() {
	o := s.opts.Load()
	s.mu.Lock()
	s.draining = true
	close(s.stopping)
	s.mu.Unlock()
	if o.DrainTimeout <= 0 {
		s.stopAccepting()
		s.cutAll(o)
		return
	}
	accepting := true
	if s.successorServes() {
		s.stopAccepting()
		accepting = false
		o.Logger.Info("another listener serves the port: new connections go there")
	}
	if n := s.active.Load(); n > 0 {
		o.Logger.Info("draining connections", "connections", n, "timeout", o.DrainTimeout, "accepting", accepting)
	}
	deadline := time.NewTimer(o.DrainTimeout)
	defer deadline.Stop()
	last := time.NewTimer(o.DrainTimeout - min(lastCall, o.DrainTimeout/4))
	defer last.Stop()
	check := time.NewTicker(successorCheck)
	defer check.Stop()
	for {
		if s.stopIfIdle() {
			return
		}
		idle := s.idleChan()
		if idle == nil {
			continue // idle since: stopIfIdle decides
		}
		select {
		case <-idle:
		case <-check.C:
			if accepting && s.successorServes() {
				s.stopAccepting()
				accepting = false
				o.Logger.Info("a successor serves the port now: new connections go there")
			}
		case <-last.C:
			if accepting {
				s.stopAccepting()
				accepting = false
			}
		case <-deadline.C:
			s.stopAccepting()
			s.cutAll(o)
			return
		}
	}
}

// successorCheck is how often a draining Server looks for a successor;
// lastCall is how long before the end of the drain it stops accepting (at
// most a quarter of the drain).
const (
	successorCheck = 250 * time.Millisecond
	lastCall       = 500 * time.Millisecond
)

// successorServes reports whether another listening socket serves the port
// of one of the Server's listeners.
func (s *Server) successorServes() bool {
	o := s.opts.Load()
	if o.SuccessorServes == nil {
		return false
	}
	s.mu.Lock()
	lns := make([]net.Listener, 0, len(s.listeners))
	for ln := range s.listeners {
		lns = append(lns, ln)
	}
	s.mu.Unlock()
	for _, ln := range lns {
		if o.SuccessorServes(ln) {
			return true
		}
	}
	return false
}

// stopAccepting closes every listener, waits until their accept loops
// have returned, and only then marks the Server shut down: a connection
// an accept loop took in the meantime is tracked and served, not accepted
// and dropped (under socket activation, connects that come after the
// close wait in the shared socket for the next process).
func (s *Server) stopAccepting() {
	s.mu.Lock()
	loops := make([]*acceptLoop, 0, len(s.listeners))
	for ln, al := range s.listeners {
		loops = append(loops, al)
		delete(s.listeners, ln)
	}
	s.mu.Unlock()
	for _, al := range loops {
		al.close()
		<-al.done
	}
	s.mu.Lock()
	s.shutdown = true
	s.mu.Unlock()
}

// stopIfIdle stops accepting if no connection is tracked, and reports
// whether the Server is still idle once its accept loops have returned
// (the drain is then over). A connection accepted in between keeps the
// drain going.
func (s *Server) stopIfIdle() bool {
	s.mu.Lock()
	idle := len(s.conns) == 0
	s.mu.Unlock()
	if !idle {
		return false
	}
	s.stopAccepting()
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns) == 0
}

// cutAll closes every connection still open at the end of the drain.
func (s *Server) cutAll(o *Options) {
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

// CloseUpstream closes the connections riding on u, each at its own
// random moment within spread (0: all at once), so that their clients do
// not all reconnect in the same instant; before each close it asks still()
// and stops when it says no (u came back, or nowhere better is left). A
// connection still waiting for u's first byte loses only its upstream leg,
// at once: its handshake is replayed to another upstream, which its client
// never notices. CloseUpstream returns when it is done, when still() says
// no, or when ctx ends or shutdown begins; it reports how many client
// connections it closed and whether it got through all of them.
func (s *Server) CloseUpstream(ctx context.Context, u *upstream.Upstream, spread time.Duration, still func() bool) (closed int, complete bool) {
	o := s.opts.Load()
	if !still() {
		return 0, false
	}
	var waiting, riding []*conn
	for _, c := range s.connsOn(u) {
		if c.replaying.Load() {
			waiting = append(waiting, c)
		} else {
			riding = append(riding, c)
		}
	}
	for _, c := range waiting {
		c.closeUpstreamLeg()
	}
	start := o.Now()
	offsets := make([]time.Duration, len(riding))
	for i := range offsets {
		if spread > 0 {
			offsets[i] = time.Duration(rand.Int64N(int64(spread))) //nolint:gosec // jitter needs no crypto randomness
		}
	}
	slices.Sort(offsets)
	complete = true
	for i, c := range riding {
		if wait := offsets[i] - o.Now().Sub(start); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				complete = false
			case <-s.stopping:
				complete = false
			case <-t.C:
			}
			t.Stop()
			if !complete {
				break
			}
		}
		if !still() {
			complete = false
			break
		}
		if c.upstream() == u && c.claim(reasonDown) {
			closed++
			o.Observer.ClosedOnDown(1)
			c.closeNow()
		}
	}
	if closed > 0 {
		o.Logger.Info("closed connections of a down upstream", "upstream", u.Addr(), "connections", closed,
			"over", o.Now().Sub(start).Round(time.Millisecond), "complete", complete)
	}
	return closed, complete
}

// connsOn returns the connections riding on u now, in no set order.
func (s *Server) connsOn(u *upstream.Upstream) []*conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*conn, 0, len(s.byUp[u]))
	for c := range s.byUp[u] {
		out = append(out, c)
	}
	return out
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
	n := 0
	for _, c := range victims {
		if c.kill(reason) {
			n++
		}
	}
	return n
}

// track starts tracking c, or reports false once shutdown has begun (the
// caller then closes it): shutdown never waits on a connection it cannot
// see.
func (s *Server) track(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shutdown {
		return false
	}
	s.conns[c] = struct{}{}
	s.index(c, nil)
	s.active.Add(1)
	return true
}

func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
	c.mu.Lock()
	s.unindex(c, c.u)
	c.mu.Unlock()
	s.active.Add(-1)
	if len(s.conns) == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
}

// index and unindex maintain byUp; s.mu must be held.
func (s *Server) index(c *conn, u *upstream.Upstream) {
	m := s.byUp[u]
	if m == nil {
		m = map[*conn]struct{}{}
		s.byUp[u] = m
	}
	m[c] = struct{}{}
}

func (s *Server) unindex(c *conn, u *upstream.Upstream) {
	if m := s.byUp[u]; m != nil {
		delete(m, c)
		if len(m) == 0 {
			delete(s.byUp, u)
		}
	}
}

// assign makes c ride on u through up. It reports false if c has been
// killed meanwhile; the caller then closes up.
func (s *Server) assign(c *conn, u *upstream.Upstream, up net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := s.conns[c]; ok {
		s.unindex(c, c.u)
		s.index(c, u)
	}
	c.u, c.up = u, up
	return c.killed == ""
}

// acceptLoop accepts until its listener is closed. Temporary failures
// (EMFILE, ENFILE, ENOBUFS, ECONNABORTED, ...) back off from 5 ms to 1 s
// and retry, as net/http's Serve does; pending connects wait in the
// kernel's backlog meanwhile.
func (s *Server) acceptLoop(al *acceptLoop) {
	defer s.wg.Done()
	defer close(al.done)
	var delay time.Duration
	for {
		fd, err := al.sock.accept()
		if err != nil {
			if al.stopped.Load() {
				return
			}
			if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
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
		pc := newConn(fd, s.opts.Load().Now())
		if !s.track(pc) {
			_ = closeFD(fd) // shutting down
			continue
		}
		s.wg.Add(1)
		go s.handle(pc)
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
	start time.Time
	// ctx ends when the connection is killed; dials for it use it.
	ctx    context.Context
	cancel context.CancelFunc

	// replaying is true until the upstream's first byte (replay phase).
	replaying atomic.Bool

	mu sync.Mutex
	// cfd is the client's socket until the flow takes it (then -1).
	cfd int
	up  net.Conn
	u   *upstream.Upstream
	// flow carries the connection once connected; up is closed then, its
	// socket lives on in flow.
	flow   *flow
	killed string
}

func newConn(cfd int, now time.Time) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	return &conn{cfd: cfd, start: now, ctx: ctx, cancel: cancel}
}

// closeClient closes the client's socket if c still holds it.
func (c *conn) closeClient() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cfd >= 0 {
		_ = closeFD(c.cfd)
		c.cfd = -1
	}
}

// takeClient hands the client's socket over to the caller.
func (c *conn) takeClient() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	fd := c.cfd
	c.cfd = -1
	return fd
}

// closeUpstreamLeg moves a connection still waiting for its upstream's
// first byte to another upstream (its handshake is replayed there).
func (c *conn) closeUpstreamLeg() {
	c.mu.Lock()
	f := c.flow
	c.mu.Unlock()
	if f != nil && c.replaying.Load() {
		f.moveOff()
	}
}

func (c *conn) upstream() *upstream.Upstream {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.u
}

// kill closes both legs; the copy goroutines then end. It reports whether
// this call killed c (false if it was killed before).
func (c *conn) kill(reason string) bool {
	first := c.claim(reason)
	c.closeNow()
	return first
}

// claim records why c is being closed and reports whether this is the
// first reason given. Callers that count closes count them between claim
// and closeNow, so a counter never lags the close its client sees.
func (c *conn) claim(reason string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	first := c.killed == ""
	if first {
		c.killed = reason
	}
	return first
}

// closeNow cancels c's work and shuts both of its sockets down; whoever
// holds them (handle, or the relay once connected) then closes them.
func (c *conn) closeNow() {
	c.mu.Lock()
	up, f := c.up, c.flow
	if c.cfd >= 0 {
		_ = shutdownFD(c.cfd)
	}
	c.mu.Unlock()
	c.cancel()
	if f != nil {
		f.kill()
		return
	}
	if up != nil {
		_ = up.Close()
	}
}

// heardWithin reports whether c's upstream socket received data within d.
func (c *conn) heardWithin(d time.Duration) bool {
	c.mu.Lock()
	up, f := c.up, c.flow
	c.mu.Unlock()
	if f != nil {
		return f.heard(d)
	}
	sc, ok := up.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	return err == nil && receivedWithin(rc, d)
}

func (c *conn) killReason() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.killed
}

// handle runs c's connecting phase and hands it to the relay; whoever ends
// c (handle itself, or the relay once established) untracks it.
func (s *Server) handle(c *conn) {
	handedOff := false
	defer func() {
		if !handedOff {
			c.cancel()
			c.closeClient()
			s.untrack(c)
			s.wg.Done()
		}
	}()
	o := s.opts.Load()
	o.Observer.Accepted()
	c.mu.Lock()
	tuneFD(c.cfd, o.KeepAlive, o.UserTimeout)
	c.mu.Unlock()

	tried := make(map[*upstream.Upstream]bool, 4)
	d, err := s.dialNext(o, c, tried, false)
	if err != nil {
		if c.killReason() == "" {
			o.Observer.NoUpstream()
			s.rlog.Log(context.Background(), slog.LevelWarn, "no-upstream", "client connection closed: no upstream reachable", "reason", err)
		}
		return
	}
	if !s.assign(c, d.u, d.up) {
		d.close()
		d.u.Release()
		return
	}
	handedOff = true
	var rp *replayState
	if o.Replay {
		rp = newReplayState(o)
	}
	s.establish(o, c, d, tried, rp)
}

// close closes what d holds.
func (d dialed) close() {
	if d.up != nil {
		_ = d.up.Close()
	} else if d.fd >= 0 {
		_ = closeFD(d.fd)
	}
}

// establish hands c, connected or connecting as d says, to the relay. From
// then on the relay owns c: when the connection ends it releases its
// upstream's place, reports the bytes, and untracks c. If the sockets
// cannot be handed over (out of descriptors, or c was closed meanwhile), c
// ends here at once.
func (s *Server) establish(o *Options, c *conn, d dialed, tried map[*upstream.Upstream]bool, rp *replayState) {
	end := func(sent, received int64, err error) {
		u := c.upstream()
		u.Release()
		o.Observer.ConnClosed(u, sent, received)
		if o.Logger.Enabled(context.Background(), slog.LevelDebug) {
			reason := c.killReason()
			if reason == "" && err != nil {
				reason = err.Error()
			}
			o.Logger.Debug("connection closed", "upstream", u.Addr(),
				"sent", sent, "received", received, "reason", reason, "age", o.Now().Sub(c.start).Round(time.Millisecond))
		}
		c.cancel()
		s.untrack(c)
		s.wg.Done()
	}
	r, err := s.startRelay()
	var f *flow
	if err == nil {
		cfd := c.takeClient()
		if cfd < 0 {
			err = errors.New("the client connection was closed")
		} else if f, err = newFlow(cfd, d, rp, end); err != nil {
			_ = closeFD(cfd)
		}
	}
	if err != nil {
		d.close()
		if failure.LocalExhaustion(err) && c.killReason() == "" {
			s.rlog.Log(context.Background(), slog.LevelWarn, "relay", "client connection closed: cannot hand it to the data path", "err", err)
		}
		end(0, 0, err)
		return
	}
	f.s, f.o, f.c, f.tried = s, o, c, tried
	if d.up != nil {
		f.connectedNow()
	} else {
		f.connectFrom(d.start)
	}
	if rp != nil {
		c.replaying.Store(true)
	}
	c.mu.Lock()
	c.flow = f
	killed := c.killed != ""
	c.mu.Unlock()
	if killed {
		f.kill() // closed while being handed over: the relay ends it
	}
	r.add(f)
}

// startRelay starts the relay's event loops at the first established
// connection; it fails only if the kernel refuses them.
func (s *Server) startRelay() (*relay, error) {
	s.relayOnce.Do(func() {
		s.relay, s.relayErr = newRelay()
		if s.relayErr != nil {
			s.relayErr = fmt.Errorf("start the data path: %w", s.relayErr)
		}
	})
	if s.relay == nil && s.relayErr == nil {
		return nil, ErrShutdown
	}
	return s.relay, s.relayErr
}

var errNoUpstream = errors.New("no upstream reachable")

// dialed is what dialNext got: a connected net.Conn from Go's dialer, or
// a descriptor whose connect is still in progress (up nil, fd >= 0; see
// connect_linux.go), started at start.
type dialed struct {
	up    net.Conn
	fd    int
	u     *upstream.Upstream
	start time.Time
}

// dialNext dials upstreams not tried yet for c, healthy ones first (only
// answering ones, see Set.PickAnswering, with answering), until one
// answers or, for a connect started without blocking, until one is under
// way. Each failure is reported to the set as a passive failure. tried
// collects every upstream attempted for this client connection. The
// upstream returned has its place in Active reserved (Pick); once
// connected it is counted (Opened: here for Go's dialer, by the loop for
// a connect under way). The caller gives the place back with Release.
func (s *Server) dialNext(o *Options, c *conn, tried map[*upstream.Upstream]bool, answering bool) (dialed, error) {
	var errs []error
	exclude := func(x *upstream.Upstream) bool { return tried[x] }
	for {
		if c.ctx.Err() != nil {
			return dialed{}, fmt.Errorf("%w: the connection was closed", errNoUpstream)
		}
		var u *upstream.Upstream
		if answering {
			u = s.set.PickAnswering(exclude)
		} else {
			u = s.set.Pick(exclude)
		}
		if u == nil {
			if len(errs) == 0 {
				return dialed{}, fmt.Errorf("%w: no upstream configured or all tried", errNoUpstream)
			}
			return dialed{}, fmt.Errorf("%w: %w", errNoUpstream, errors.Join(errs...))
		}
		tried[u] = true
		start := o.Now()
		var err error
		if ap, perr := netip.ParseAddrPort(u.Addr()); perr == nil && o.dialTuned && rawConnectSupported {
			var fd int
			if fd, err = rawConnect(ap, o.KeepAlive, o.UserTimeout); err == nil {
				return dialed{fd: fd, u: u, start: start}, nil
			}
			o.Observer.DialDuration(o.Now().Sub(start))
		} else {
			ctx, cancel := context.WithTimeout(c.ctx, o.DialTimeout)
			var up net.Conn
			up, err = o.Dial(ctx, "tcp", u.Addr())
			cancel()
			o.Observer.DialDuration(o.Now().Sub(start))
			if err == nil {
				u.Opened()
				if !o.dialTuned {
					tuneConn(up, o)
				}
				return dialed{up: up, fd: -1, u: u, start: start}, nil
			}
		}
		u.Release()
		if c.ctx.Err() != nil {
			return dialed{}, fmt.Errorf("%w: the connection was closed", errNoUpstream)
		}
		if failure.LocalExhaustion(err) {
			// Out of descriptors here: not the upstream's fault, and no
			// other upstream would do better.
			return dialed{}, fmt.Errorf("%w: %s: %w", errNoUpstream, u.Addr(), err)
		}
		s.dialFailed(o, u, err)
		errs = append(errs, fmt.Errorf("%s: %w", u.Addr(), err))
	}
}

// dialFailed reports a failed connect to u.
func (s *Server) dialFailed(o *Options, u *upstream.Upstream, err error) {
	kind := failure.Classify(err)
	o.Observer.DialFailed(u, kind)
	s.set.Passive(u, fmt.Sprintf("connect failed (%s): %v", kind, err))
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
func (nopObserver) DialFailed(*upstream.Upstream, failure.Kind) {}

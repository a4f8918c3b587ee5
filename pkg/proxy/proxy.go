// Package proxy accepts client connections and forwards their raw TCP
// streams to upstreams picked from an upstream.Set.
//
// A Server owns its accept loops (one per listener given to Serve), the
// event loops of its data path (package relay), and the optional
// rebalancer; Run stops and waits for all of them. The data path is in
// layers, each depending only on those below it:
//
//   - relay (pkg/proxy/relay): event loops carrying descriptors, buffers
//     and half-close; it reports what happens on a connection to a
//     Handler and carries out the verdict. Nothing about upstreams.
//   - connect and replay beside it: a connect started without blocking,
//     and the kept TLS handshake (replay.Keeper).
//   - this package on top: accept, pick, the connection's phases and their
//     owners (conn.go), the decisions as plain functions (policy.go),
//     their execution (events.go, move.go), close_on_down, rebalance and
//     drain.
//
// A connection is dialled in a goroutine of its own; a failed connect is
// reported to the upstream set as a passive failure (a probe then decides
// whether the upstream is down) and the same client connection is tried
// on the next upstream. Once connected (or connecting without blocking),
// both sockets are handed to the relay and the goroutine ends: a
// connection costs a small struct and no goroutine or buffer while idle.
// With replay, the client's TLS handshake is kept until the upstream's
// first byte and may be replayed to another upstream (see replay.go).
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
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
	"github.com/extractedprism/extractedprism/pkg/proxy/relay"
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
	// Refused: a client connection was accepted and reset at once, for
	// reason (RefusedMaxConnections).
	Refused(reason string)
}

// RefusedMaxConnections is the reason of a connection refused because
// MaxConnections were being proxied.
const RefusedMaxConnections = "max_connections"

// Options configure a Server. Zero values get the defaults documented per
// field.
type Options struct {
	// Set supplies upstreams (required).
	Set *upstream.Set
	// Dial connects to upstreams. Default: upstreams given as IP addresses
	// are connected from the event loops without blocking (see
	// package connect), others with a net.Dialer; both apply KeepAlive
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
	// DrainSpread: when a successor serves the port (SuccessorServes),
	// the connections still open near the end of the drain are cut each
	// at its own random moment within the last DrainSpread of it (at most
	// half the drain) instead of all at once, so that their clients (a
	// node's watches) reconnect to the successor spread out, once each.
	// Without a successor they are cut together at the end: a client that
	// reconnected earlier would only reach this draining process again.
	// 0 = all at once.
	DrainSpread time.Duration
	// Replay enables handshake replay before the first upstream byte.
	Replay bool
	// FirstByteTimeout is how long an upstream may stay silent after the
	// client's first bytes before the handshake is replayed to another
	// upstream that is up and answers its probes, if there is one (0 = no
	// limit). Only used with Replay.
	FirstByteTimeout time.Duration
	// ReplayBufferBytes bounds the kept handshake (default 16 KiB).
	ReplayBufferBytes int
	// MaxConnections caps the client connections tracked at once, over
	// all listeners and upstreams (0 = no cap). A connection accepted
	// beyond it is reset at once (SO_LINGER 0), counted (Refused) and
	// logged at a limited rate; it never waits in the backlog. Lowering
	// it on SetOptions cuts no connection: new ones are refused until
	// enough have ended.
	MaxConnections int
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

	// relay carries established connections; started at the first one
	// (tried again at the next if it fails), never after Run has stopped
	// it (relayMu guards the start and the stop).
	relayMu      sync.Mutex
	relay        atomic.Pointer[relay.Relay]
	relayStopped bool
	// newRelay starts the relay (default relay.New with the default
	// config); tests inject failures through it.
	newRelay func() (*relay.Relay, error)

	active atomic.Int64
	// refused counts connections refused by MaxConnections.
	refused   atomic.Uint64
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

// Alive reports whether no accept loop and no event loop has died
// unexpectedly (LivenessError says which).
func (s *Server) Alive() bool { return s.LivenessError() == nil }

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

// MaxConnections returns the cap on Active in force (0 = none).
func (s *Server) MaxConnections() int { return s.opts.Load().MaxConnections }

// Refused returns how many connections were refused because
// MaxConnections were being proxied.
func (s *Server) Refused() uint64 { return s.refused.Load() }

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
	s.relayMu.Lock()
	s.relayStopped = true // no relay may start from now on
	r := s.relay.Load()
	s.relayMu.Unlock()
	if r != nil {
		r.Stop()
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
	handedOver := !accepting
	start := o.Now()
	deadline := time.NewTimer(o.DrainTimeout)
	defer deadline.Stop()
	last := time.NewTimer(o.DrainTimeout - min(lastCall, o.DrainTimeout/4))
	defer last.Stop()
	spread := min(o.DrainSpread, o.DrainTimeout/2)
	spreadAt := time.NewTimer(o.DrainTimeout - spread)
	defer spreadAt.Stop()
	spreadDue, spreading := false, false
	stopSpread := make(chan struct{})
	var spreadDone chan struct{}
	defer func() {
		close(stopSpread)
		if spreadDone != nil {
			<-spreadDone
		}
	}()
	startSpread := func() {
		if spreading || !spreadDue || !handedOver || spread <= 0 {
			return
		}
		spreading = true
		spreadDone = make(chan struct{})
		go func() {
			defer close(spreadDone)
			s.cutSpread(o, start.Add(o.DrainTimeout).Sub(o.Now()), stopSpread)
		}()
	}
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
				accepting, handedOver = false, true
				o.Logger.Info("a successor serves the port now: new connections go there")
				startSpread()
			}
		case <-last.C:
			if accepting {
				s.stopAccepting()
				accepting = false
			}
		case <-spreadAt.C:
			spreadDue = true
			startSpread()
		case <-deadline.C:
			s.stopAccepting()
			s.cutAll(o)
			return
		}
	}
}

// cutSpread cuts the connections open now, each at its own random moment
// within window, until stop is closed (the drain is over: cutAll takes
// what is left). It reports the cuts like cutAll.
func (s *Server) cutSpread(o *Options, window time.Duration, stop <-chan struct{}) {
	s.mu.Lock()
	victims := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		victims = append(victims, c)
	}
	s.mu.Unlock()
	if len(victims) == 0 || window <= 0 {
		return
	}
	offsets := make([]time.Duration, len(victims))
	for i := range offsets {
		offsets[i] = time.Duration(rand.Int64N(int64(window))) //nolint:gosec // jitter needs no crypto randomness
	}
	slices.Sort(offsets)
	o.Logger.Info("cutting the connections left spread out, before the drain ends", "connections", len(victims), "over", window.Round(time.Millisecond))
	begin := o.Now()
	cut := 0
	defer func() {
		if cut > 0 {
			o.Observer.DrainCut(cut)
		}
	}()
	for i, c := range victims {
		if wait := offsets[i] - o.Now().Sub(begin); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-stop:
				t.Stop()
				return
			case <-t.C:
			}
		}
		if c.kill(reasonDrain) {
			cut++
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
		if c.waiting() {
			waiting = append(waiting, c)
		} else {
			riding = append(riding, c)
		}
	}
	for _, c := range waiting {
		c.closeUpstreamLeg(u)
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

// Results of track.
type trackResult int

const (
	tracked  trackResult = iota
	shutDown             // shutdown has begun
	full                 // MaxConnections are tracked
)

// track starts tracking c. It refuses once shutdown has begun (shutdown
// never waits on a connection it cannot see) and while c's MaxConnections
// are tracked; the caller then closes c's socket. The count is taken
// under s.mu, so accept loops of several listeners together never exceed
// the cap.
func (s *Server) track(c *conn) trackResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shutdown {
		return shutDown
	}
	if limit := c.o.MaxConnections; limit > 0 && len(s.conns) >= limit {
		return full
	}
	s.conns[c] = struct{}{}
	s.index(c, nil)
	s.active.Add(1)
	return tracked
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
		pc := newConn(s, s.opts.Load(), fd)
		switch s.track(pc) {
		case tracked:
		case full:
			pc.cancel()
			s.refuse(pc.o, fd)
			continue
		default:
			pc.cancel()
			_ = closeFD(fd) // shutting down
			continue
		}
		s.wg.Add(1)
		go s.handle(pc)
	}
}

// refuse resets a connection accepted beyond MaxConnections: the client
// sees its connect succeed and its first read fail with a reset, at once,
// rather than waiting in the backlog until it times out; and no TIME_WAIT
// is left behind however many are refused. It is counted and logged once
// per window with a count.
func (s *Server) refuse(o *Options, fd int) {
	_ = resetFD(fd)
	s.refused.Add(1)
	o.Observer.Refused(RefusedMaxConnections)
	s.rlog.Log(context.Background(), slog.LevelWarn, "refused "+RefusedMaxConnections,
		"connection refused: proxy.max_connections reached", "max_connections", o.MaxConnections,
		"active", s.active.Load())
}

// logAcceptError logs accept failures once per window with a count.
func (s *Server) logAcceptError(err error, delay time.Duration) {
	s.rlog.Log(context.Background(), slog.LevelWarn, "accept", "accept failed, retrying", "err", err, "retry_in", delay)
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
func (nopObserver) Refused(string)                              {}

// LivenessError says why the Server is not alive (an accept loop or an
// event loop of the data path died), or nil.
func (s *Server) LivenessError() error {
	if s.loopDied.Load() {
		return errAcceptLoopDied
	}
	if r := s.relay.Load(); r != nil {
		return r.Err()
	}
	return nil
}

var errAcceptLoopDied = errors.New("accept loop died")

package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
	"github.com/extractedprism/extractedprism/pkg/proxy/connect"
	"github.com/extractedprism/extractedprism/pkg/proxy/relay"
	"github.com/extractedprism/extractedprism/pkg/proxy/replay"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// A client connection's life, in phases (policy.go), each with one owner:
//
//   - connecting, from the accept: the handle goroutine picks an upstream
//     and dials it with Go's dialer, or starts a connect without blocking
//     (package connect) that the flow's event loop then waits for. A failed
//     connect tries the next upstream within the same client connection.
//   - waiting (replay on), connected, until the upstream's first byte: the
//     loop keeps the client's handshake (replay.Keeper); an upstream
//     failure, a first-byte timeout or a move (close_on_down) sends the
//     connection to the next upstream, where the handshake is replayed.
//   - relaying: plain forwarding by the loop.
//   - moving: out of its loop (relay.Detach), the mover goroutine
//     (move.go) reports the failure, dials the next upstream and gives the
//     flow back to its loop, or ends it.
//   - closing: ended; its upstream place released, its bytes reported,
//     untracked.
//
// Once handed to the relay, the owner is the flow's loop (connecting,
// waiting, relaying) or the mover (moving): the owner alone writes the
// phase and the fields marked "owner", and the relay calls conn's Handler
// methods (events.go) only on the owner. Other goroutines read the phase
// and reach the connection only through requests: kill (closeNow), move
// (closeUpstreamLeg, naming the upstream it is for) and the timers'
// expiries (naming the connect or first-byte generation they are for).
// Each request sets a flag and wakes the loop; Woken checks it against
// what the connection is doing now, so a stale one is ignored.

const (
	reasonDrain     = "drain timeout"
	reasonDown      = "upstream down"
	reasonRebalance = "rebalance"
)

// Requests: set by any goroutine, then the flow is woken; its owner reads
// them in Woken.
const (
	reqMove      uint32 = 1 << iota // close_on_down (for conn.moveFrom)
	reqDial                         // the connect deadline passed (for dialExpired)
	reqFirstByte                    // the first-byte deadline passed (for firstByteExpired)
)

// conn is one proxied client connection.
type conn struct {
	s     *Server
	o     *Options // as they were at the accept
	start time.Time
	// replay: the connection may be replayed until its first byte.
	replay bool
	// ctx ends when the connection is killed; dials for it use it.
	ctx    context.Context
	cancel context.CancelFunc
	// phase is written by the owner only, read by anyone.
	phase atomic.Uint32

	mu sync.Mutex
	// cfd is the client's socket until the flow takes it (then -1).
	cfd int
	up  net.Conn
	u   *upstream.Upstream
	// flow carries the connection once connected; up is closed then, its
	// socket lives on in flow.
	flow   *relay.Flow
	killed string
	// moveFrom is the upstream the last move request was for.
	moveFrom *upstream.Upstream

	reqs             atomic.Uint32
	dialExpired      atomic.Uint32 // the connect generation whose deadline passed
	firstByteExpired atomic.Uint32 // the first-byte generation whose deadline passed

	// Owner only.
	tried map[*upstream.Upstream]bool // every upstream dialled for c
	keep  replay.Keeper
	// gen counts the upstreams tried while waiting; a first-byte deadline
	// of an earlier one is ignored.
	gen     uint32
	fbTimer *time.Timer
	// patient: the first-byte deadline passed while no other upstream
	// answered, so the connection waits for this one without a deadline.
	patient bool
	// The connect under way: since dialStart, deadline dialTimer of
	// generation dialGen.
	dialStart time.Time
	dialGen   uint32
	dialTimer *time.Timer
	// failedOver: Failover was counted. opened: ConnOpened was reported
	// for the current upstream, so its ConnClosed is due (exactly once).
	failedOver, opened bool
	// why and cause: why the flow left its loop (for the mover), and
	// whether it was connecting then.
	why            replayWhy
	cause          error
	fromConnecting bool
}

func newConn(s *Server, o *Options, cfd int) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	return &conn{s: s, o: o, cfd: cfd, start: o.Now(), replay: o.Replay, ctx: ctx, cancel: cancel}
}

func (c *conn) phaseNow() phase  { return phase(c.phase.Load()) }
func (c *conn) setPhase(p phase) { c.phase.Store(uint32(p)) }

// waiting reports whether a close_on_down moves c rather than closes it:
// with replay on, until its upstream's first byte.
func (c *conn) waiting() bool {
	p := c.phaseNow()
	return c.replay && p != phaseRelaying && p != phaseClosing
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

// request sets flag and wakes c's flow, if it has one yet (establish
// wakes it otherwise).
func (c *conn) request(flag uint32) {
	c.reqs.Or(flag)
	c.mu.Lock()
	f := c.flow
	c.mu.Unlock()
	if f != nil {
		f.Wake()
	}
}

// closeUpstreamLeg moves a connection still waiting for u's first byte to
// another upstream (its handshake is replayed there); the request names u,
// so that it is ignored if the connection has left u meanwhile.
func (c *conn) closeUpstreamLeg(u *upstream.Upstream) {
	c.mu.Lock()
	c.moveFrom = u
	c.mu.Unlock()
	c.request(reqMove)
}

// moveMeant reports whether the move request is for the upstream c rides
// on now.
func (c *conn) moveMeant() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.moveFrom != nil && c.moveFrom == c.u
}

func (c *conn) upstream() *upstream.Upstream {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.u
}

// kill closes both legs; the relay then ends the flow. It reports whether
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
		f.Kill()
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
		return f.WithSockets(func(_, ufd int) bool { return ufd >= 0 && receivedOnFD(ufd, d) })
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
			c.setPhase(phaseClosing)
			c.cancel()
			c.closeClient()
			s.untrack(c)
			s.wg.Done()
		}
	}()
	o := c.o
	o.Observer.Accepted()
	c.mu.Lock()
	tuneFD(c.cfd, o.KeepAlive, o.UserTimeout)
	c.mu.Unlock()
	if c.replay {
		c.keep = replay.NewKeeper(o.ReplayBufferBytes)
	}
	c.tried = make(map[*upstream.Upstream]bool, 4)
	d, err := s.dialNext(o, c, c.tried, false)
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
	s.establish(c, d)
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
// upstream's place, reports the bytes, and untracks c (Ended). If the
// sockets cannot be handed over (the data path does not start, out of
// descriptors, or c was closed meanwhile), c ends here at once and its
// client is closed.
func (s *Server) establish(c *conn, d dialed) {
	r, err := s.startRelay()
	var f *relay.Flow
	if err == nil {
		cfd := c.takeClient()
		ufd := d.fd
		switch {
		case cfd < 0:
			err = errors.New("the client connection was closed")
		case d.up != nil:
			if ufd, err = detach(d.up); err != nil {
				_ = closeFD(cfd)
				err = fmt.Errorf("upstream: %w", err)
			}
		}
		if err == nil {
			f = relay.NewFlow(cfd, ufd, c)
		}
	}
	if err != nil {
		d.close()
		c.closeClient()
		if c.killReason() == "" {
			s.rlog.Log(context.Background(), slog.LevelWarn, "relay", "client connection closed: cannot hand it to the data path", "err", err)
		}
		c.Ended(nil, 0, 0, err)
		return
	}
	if c.replay {
		f.Watch()
	}
	if d.up != nil {
		c.connectedNow()
	} else {
		f.Connecting()
		c.connectFrom(d.start)
	}
	c.mu.Lock()
	c.flow = f
	killed := c.killed != ""
	c.mu.Unlock()
	if c.reqs.Load() != 0 {
		f.Wake() // requested before the flow existed: its loop sees it at once
	}
	if killed {
		f.Kill() // closed while being handed over: the relay ends it
	}
	if !r.Add(f) {
		// Every event loop has died (Alive says so): the client is
		// closed rather than left waiting.
		f.End(relay.ErrStopped)
	}
}

// connectFrom records that c's upstream socket is connecting since start
// and arms its connect deadline. Owner only.
func (c *conn) connectFrom(start time.Time) {
	c.setPhase(phaseConnecting)
	c.dialStart = start
	c.dialGen++
	gen := c.dialGen
	c.dialTimer = time.AfterFunc(c.o.DialTimeout, func() {
		c.dialExpired.Store(gen)
		c.request(reqDial)
	})
}

func (c *conn) stopDialTimer() {
	if c.dialTimer != nil {
		c.dialTimer.Stop()
		c.dialTimer = nil
	}
}

// connectedNow records that c's upstream socket is connected. Owner only.
func (c *conn) connectedNow() {
	if c.replay {
		c.setPhase(phaseWaiting)
	} else {
		c.setPhase(phaseRelaying)
	}
	if len(c.tried) > 1 && !c.failedOver {
		c.failedOver = true
		c.o.Observer.Failover() // once per connection, however many tries
	}
	c.opened = true
	c.o.Observer.ConnOpened(c.upstream())
}

// armFirstByte starts the current upstream's first-byte deadline once the
// client has sent bytes. Owner only.
func (c *conn) armFirstByte() {
	fbt := c.o.FirstByteTimeout
	if fbt <= 0 || c.fbTimer != nil || c.patient || c.keep.FromClient() == 0 || c.phaseNow() != phaseWaiting {
		return
	}
	gen := c.gen
	c.fbTimer = time.AfterFunc(fbt, func() {
		c.firstByteExpired.Store(gen)
		c.request(reqFirstByte)
	})
}

func (c *conn) stopFirstByte() {
	if c.fbTimer != nil {
		c.fbTimer.Stop()
		c.fbTimer = nil
	}
}

// startRelay starts the relay's event loops at the first established
// connection. If the kernel refuses them (out of descriptors), the
// connection fails and the next one tries again.
func (s *Server) startRelay() (*relay.Relay, error) {
	if r := s.relay.Load(); r != nil {
		return r, nil
	}
	s.relayMu.Lock()
	defer s.relayMu.Unlock()
	if r := s.relay.Load(); r != nil {
		return r, nil
	}
	if s.relayStopped {
		return nil, ErrShutdown
	}
	start := s.newRelay
	if start == nil {
		start = func() (*relay.Relay, error) { return relay.New(relay.Config{}) }
	}
	r, err := start()
	if err != nil {
		return nil, fmt.Errorf("start the data path: %w", err)
	}
	s.relay.Store(r)
	return r, nil
}

var errNoUpstream = errors.New("no upstream reachable")

// dialed is what dialNext got: a connected net.Conn from Go's dialer, or
// a descriptor whose connect is still in progress (up nil, fd >= 0; see
// package connect), started at start.
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
// connected it is counted (Opened: here for Go's dialer, by Connected
// for a connect under way). The caller gives the place back with Release.
func (s *Server) dialNext(o *Options, c *conn, tried map[*upstream.Upstream]bool, answering bool) (dialed, error) {
	var errs []error
	exclude := func(x *upstream.Upstream) bool { return tried[x] }
	ka, ut := o.KeepAlive, o.UserTimeout
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
		if ap, perr := netip.ParseAddrPort(u.Addr()); perr == nil && o.dialTuned && connect.Supported {
			var fd int
			if fd, err = connect.Start(ap, func(fd int) { tuneFD(fd, ka, ut) }); err == nil {
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

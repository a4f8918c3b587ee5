//go:build linux

package proxy

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/extractedprism/extractedprism/pkg/upstream"
	"golang.org/x/sys/unix"
)

// The data path.
//
// As soon as an upstream connect succeeds, the client's and the upstream's
// sockets leave Go's runtime poller: detach duplicates their descriptors
// and closes the net.Conn values, and the pair becomes a flow in one of a
// few event loops (one per GOMAXPROCS, round robin). Each loop owns an
// epoll instance (edge-triggered), one read buffer that all its flows
// share, and its flows. A flow costs no goroutine and no buffer while
// idle: bytes are read into the loop's buffer and written straight to the
// other socket; only when that socket cannot take them all is the rest
// copied into a buffer of the flow's own, and reading from the source
// stops until it is flushed (the kernel's socket buffers then push back on
// the sender, as with any TCP proxy).
//
// Half-close is forwarded: a read of 0 bytes (FIN) from one side becomes
// shutdown(SHUT_WR) on the other once everything before it was written. A
// flow ends when both directions have ended, or at once on an error on
// either socket; then both descriptors are closed and the connection is
// untracked, its upstream place released and its bytes reported.
//
// Until the upstream's first byte a flow is in its replay phase (see
// replay.go): the loop also keeps the client's handshake bytes, and when
// the upstream fails before answering (or its first-byte deadline passes,
// or the balancer moves the connection off it), the loop takes the flow
// out of epoll and a goroutine dials the next upstream; the flow then
// comes back to the same loop with the kept bytes pending for the new
// upstream.
//
// Ownership: while registered, a flow's loop goroutine alone reads and
// writes its sockets and its loop-owned fields; while it is out for a
// replay, the replay goroutine does. Other goroutines touch a flow only
// through kill (shutdown of both sockets, which the loop then sees as the
// end of both directions), heard (a TCP_INFO read) and nudge (a flag and a
// wake-up of its loop); all hold flow.mu, which is also held while a
// descriptor is closed or replaced, so nobody acts on a descriptor number
// after it was closed and possibly reused.

// relayReadBytes is the size of each loop's shared read buffer, and
// relayBudget how many reads one side of a flow gets per turn before the
// loop serves other flows.
const (
	relayReadBytes = 64 << 10
	relayBudget    = 4
)

// relay is the set of event loops of one Server.
type relay struct {
	loops []*loop
	next  uint32
	mu    sync.Mutex // guards next
	wg    sync.WaitGroup
}

func newRelay() (*relay, error) {
	n := max(1, runtime.GOMAXPROCS(0))
	r := &relay{}
	for range n {
		l, err := newLoop()
		if err != nil {
			r.stop()
			return nil, err
		}
		r.loops = append(r.loops, l)
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			l.run()
		}()
	}
	return r, nil
}

// add gives f to the next loop, round robin.
func (r *relay) add(f *flow) {
	r.mu.Lock()
	l := r.loops[r.next%uint32(len(r.loops))]
	r.next++
	r.mu.Unlock()
	l.add(f)
}

// stop ends every loop and waits for them. Flows still registered are
// torn down first, as if killed.
func (r *relay) stop() {
	for _, l := range r.loops {
		l.stop()
	}
	r.wg.Wait()
}

// loop is one event loop: an epoll instance, its flows and its buffer.
//
// The loop never blocks in epoll_wait: its epoll descriptor is itself
// registered with Go's poller, and the loop goroutine parks there while no
// event is pending (ep.Read below). A goroutine blocked in a system call
// instead would keep the runtime's monitor thread polling every few
// microseconds and cost a thread handoff per wake-up.
type loop struct {
	epfd int
	ep   syscall.RawConn // epfd in Go's poller
	file *os.File        // owns epfd
	wake int             // eventfd: new flows queued, or stop

	mu       sync.Mutex // guards queued, poked and stopping
	queued   []*flow    // to register
	poked    []*flow    // nudged: look at their flags
	stopping bool
	news     atomic.Bool // queued, poked or stopping changed since the loop looked

	// Owned by the loop goroutine.
	flows []*flow // by slot
	free  []int32
	ready []*flow // flows with work left after their budget
	buf   []byte
}

func newLoop() (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		_ = unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: -1}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &ev); err != nil {
		_ = unix.Close(wake)
		_ = unix.Close(epfd)
		return nil, fmt.Errorf("epoll_ctl eventfd: %w", err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		_ = unix.Close(wake)
		_ = unix.Close(epfd)
		return nil, fmt.Errorf("epoll nonblocking: %w", err)
	}
	file := os.NewFile(uintptr(epfd), "epoll") //nolint:gosec // a descriptor just created
	ep, err := file.SyscallConn()
	if err != nil {
		_ = unix.Close(wake)
		_ = file.Close()
		return nil, fmt.Errorf("epoll in Go's poller: %w", err)
	}
	return &loop{epfd: epfd, ep: ep, file: file, wake: wake, buf: make([]byte, relayReadBytes)}, nil
}

func (l *loop) add(f *flow) {
	l.mu.Lock()
	l.queued = append(l.queued, f)
	l.news.Store(true)
	l.mu.Unlock()
	l.signal()
}

// poke asks the loop to look at f's nudge flags.
func (l *loop) poke(f *flow) {
	l.mu.Lock()
	l.poked = append(l.poked, f)
	l.news.Store(true)
	l.mu.Unlock()
	l.signal()
}

func (l *loop) stop() {
	l.mu.Lock()
	l.stopping = true
	l.news.Store(true)
	l.mu.Unlock()
	l.signal()
}

func (l *loop) signal() {
	one := [8]byte{1}
	for {
		_, err := rawWrite(l.wake, one[:])
		if !errors.Is(err, unix.EINTR) {
			return // EAGAIN: the counter is full, a wake is pending anyway
		}
	}
}

func (l *loop) run() {
	defer func() {
		_ = unix.Close(l.wake)
		_ = l.file.Close()
	}()
	events := make([]unix.EpollEvent, 128)
	done := false
	// The whole loop runs inside one RawRead: turn returns false to park
	// in Go's poller until epfd has events, true when the loop ends. An
	// event that comes while a turn runs marks epfd ready, so the next
	// wait returns at once and nothing is missed.
	err := l.ep.Read(func(fd uintptr) bool {
		for {
			n, err := rawEpollWait(int(fd), events)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				// Cannot happen with a valid epfd and buffer; end every
				// flow rather than spin.
				l.shutdown()
				done = true
				return true
			}
			if l.turn(events[:n]) {
				done = true
				return true
			}
			if n < len(events) && len(l.ready) == 0 {
				return false // all pending events taken: park
			}
		}
	})
	if err != nil && !done {
		l.shutdown()
	}
}

// turn handles one batch of events, the flows left over from the last
// turn, and new flows. It reports true when the loop has been stopped and
// has ended its flows.
func (l *loop) turn(events []unix.EpollEvent) bool {
	for i := range events {
		ev := &events[i]
		if ev.Fd < 0 {
			var b [8]byte
			_, _ = rawRead(l.wake, b[:])
			continue
		}
		f := l.flows[ev.Fd]
		if f == nil {
			continue // ended earlier in this batch
		}
		side := int(ev.Pad)
		if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			f.readable[side] = true
		}
		if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			f.hup[side] = true
		}
		if ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			f.writable[side] = true
		}
		l.serve(f)
	}
	if ready := l.ready; len(ready) > 0 {
		l.ready = nil
		for _, f := range ready {
			f.queued = false
			if l.flows[f.slot] == f {
				l.serve(f)
			}
		}
	}
	if !l.news.Load() {
		return false
	}
	l.mu.Lock()
	queued, poked, stopping := l.queued, l.poked, l.stopping
	l.queued, l.poked = nil, nil
	l.news.Store(false)
	l.mu.Unlock()
	for _, f := range queued {
		l.register(f)
	}
	for _, f := range poked {
		l.nudged(f)
	}
	if stopping {
		l.shutdown()
		return true
	}
	return false
}

// register takes f into the loop: a slot, then both sockets in epoll.
func (l *loop) register(f *flow) {
	f.home = l
	f.queued = false
	if len(l.free) > 0 {
		f.slot = l.free[len(l.free)-1]
		l.free = l.free[:len(l.free)-1]
		l.flows[f.slot] = f
	} else {
		f.slot = int32(len(l.flows)) //nolint:gosec // bounded by descriptors
		l.flows = append(l.flows, f)
	}
	// Both sides may already hold data or be writable: assume so, and let
	// the first reads and writes find out; a connecting upstream socket
	// waits for its event.
	f.readable = [2]bool{true, !f.connecting}
	f.writable = [2]bool{true, !f.connecting}
	for side := range 2 {
		ev := unix.EpollEvent{
			Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET,
			Fd:     f.slot,
			Pad:    int32(side), //nolint:gosec // 0 or 1
		}
		if err := rawEpollCtl(l.epfd, unix.EPOLL_CTL_ADD, f.fd[side], &ev); err != nil {
			f.err = fmt.Errorf("epoll_ctl: %w", err)
			l.end(f)
			return
		}
	}
	f.mu.Lock()
	f.loop = l
	f.mu.Unlock()
	if f.nudges.Load() != 0 {
		l.nudged(f) // nudged while out for a replay
		if l.flows[f.slot] != f {
			return
		}
	}
	l.serve(f)
}

// toReplay sends f, whose replayWhy is set, out to a replay goroutine.
func (l *loop) toReplay(f *flow) {
	l.unregister(f)
	if f.rp != nil {
		f.rp.stopTimer()
	}
	f.stopDialTimer()
	go f.s.replayFlow(f)
}

// unregister takes f out of the loop without closing its sockets (for a
// replay); f comes back through add.
func (l *loop) unregister(f *flow) {
	for side := range 2 {
		if f.fd[side] >= 0 {
			_ = rawEpollCtl(l.epfd, unix.EPOLL_CTL_DEL, f.fd[side], &unix.EpollEvent{})
		}
	}
	l.flows[f.slot] = nil
	l.free = append(l.free, f.slot)
	if f.queued {
		for i, r := range l.ready {
			if r == f {
				l.ready = append(l.ready[:i], l.ready[i+1:]...)
				break
			}
		}
		f.queued = false
	}
	f.mu.Lock()
	f.loop = nil
	f.mu.Unlock()
}

// shutdown ends every flow still in the loop.
func (l *loop) shutdown() {
	l.mu.Lock()
	queued := l.queued
	l.queued = nil
	l.mu.Unlock()
	for _, f := range queued {
		f.err = errRelayStopped
		f.finish()
	}
	for _, f := range l.flows {
		if f != nil {
			f.err = errRelayStopped
			l.end(f)
		}
	}
}

var errRelayStopped = errors.New("relay stopped")

// serve moves bytes both ways as far as the sockets allow, then ends f if
// both directions are done or a socket failed.
func (l *loop) serve(f *flow) {
	if f.connecting && !l.connectDone(f) {
		return
	}
	more := f.pump(l.buf, 0) // client to upstream
	if f.replayWhy == 0 {
		more = f.pump(l.buf, 1) || more
	}
	if f.replayWhy != 0 {
		l.toReplay(f)
		return
	}
	if f.err != nil || (f.done[0] && f.done[1]) {
		l.end(f)
		return
	}
	if more && !f.queued {
		f.queued = true
		l.ready = append(l.ready, f)
	}
}

// end closes f's sockets and frees its slot; the connection's owner-side
// bookkeeping runs in finish.
func (l *loop) end(f *flow) {
	if l.flows[f.slot] == f {
		l.flows[f.slot] = nil
		l.free = append(l.free, f.slot)
	}
	f.finish()
}

// flow is one established connection in a loop. Side 0 is the client,
// side 1 the upstream.
type flow struct {
	// fd[0] is the client's socket, fd[1] the upstream's (-1 while a
	// replay replaces it). Changed only under mu.
	fd [2]int

	// onEnd runs once when the flow has ended and its sockets are closed,
	// with the bytes written to the upstream (sent) and to the client
	// (received) and the error that ended it, if any.
	onEnd func(sent, received int64, err error)

	mu     sync.Mutex // guards fd, closed and loop against kill, heard and nudge
	closed bool
	loop   *loop // the loop f is registered with; nil while out for a replay

	// nudges holds nudge flags for the loop (see replay.go).
	nudges atomic.Uint32
	// expiredGen is the upstream generation whose first-byte deadline passed.
	expiredGen atomic.Uint32

	// dialExpired is the connect generation whose deadline passed.
	dialExpired atomic.Uint32

	// Set once by establish.
	s     *Server
	o     *Options
	c     *conn
	tried map[*upstream.Upstream]bool // every upstream dialled for c

	// Owned by the loop goroutine (by the replay goroutine while out).
	home *loop // the loop f belongs to, also while out for a replay
	rp   *replayState
	// connecting: fd[1]'s connect is under way (since dialStart; its
	// deadline is dialTimer, generation dialGen).
	connecting bool
	dialStart  time.Time
	dialGen    uint32
	dialTimer  *time.Timer
	failedOver bool // Failover was counted
	// replayWhy, when set by pump, sends f to a replay: why, and the
	// upstream error that caused it.
	replayWhy   replayWhy
	replayCause error
	slot        int32
	queued      bool
	readable    [2]bool // side may have bytes (or EOF) to read
	hup         [2]bool // side's peer closed: read until EOF, not just a short read
	writable    [2]bool // side's send buffer may take bytes
	// pending[s] holds bytes read for side s that it could not take yet.
	pending [2][]byte
	// eof[s]: side s has sent FIN; done[s]: everything from side s has
	// been written to the other side and the FIN passed on.
	eof   [2]bool
	done  [2]bool
	bytes [2]int64 // bytes written to each side
	err   error
}

// pump moves bytes from side src to the other side. It reports whether src
// still has bytes to read after using its budget.
func (f *flow) pump(buf []byte, src int) bool {
	dst := 1 - src
	if f.done[src] || f.err != nil {
		return false
	}
	if len(f.pending[dst]) > 0 {
		if !f.writable[dst] || !f.write(dst, f.pending[dst], true) {
			if dst == 1 && f.err != nil && f.rp != nil && f.upstreamFailed(f.err) {
				f.err = nil
			}
			return false
		}
		f.pending[dst] = nil
		if dst == 1 && f.rp != nil {
			f.armFirstByte()
		}
	}
	for range relayBudget {
		if f.eof[src] {
			f.passEOF(src)
			return false
		}
		if !f.readable[src] {
			return false
		}
		n, err := rawRead(f.fd[src], buf)
		switch {
		case errors.Is(err, unix.EAGAIN):
			f.readable[src] = false
			return false
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			if src == 1 && f.rp != nil && f.upstreamFailed(err) {
				return false
			}
			f.err = fmt.Errorf("read: %w", err)
			return false
		case n == 0:
			if src == 1 && f.rp != nil && f.upstreamFailed(io.EOF) {
				return false
			}
			f.eof[src] = true
			continue
		}
		if f.rp != nil {
			if src == 1 {
				f.answered()
			} else {
				f.rp.keep(buf[:n])
			}
		}
		if n < len(buf) && !f.hup[src] {
			// A short read took everything the socket held; a later
			// arrival raises a new edge. A FIN already flagged must still
			// be read, so a hung-up side reads on until EOF.
			f.readable[src] = false
		}
		if !f.write(dst, buf[:n], false) {
			if dst == 1 && f.err != nil && f.rp != nil && f.upstreamFailed(f.err) {
				f.err = nil
			}
			return false
		}
		if dst == 1 && f.rp != nil {
			f.armFirstByte()
		}
	}
	return f.readable[src] || (f.eof[src] && !f.done[src])
}

// write writes b to side dst. Whatever the socket does not take now is
// kept in pending[dst] (copied, unless b is pending[dst] already), and
// write reports false; it also reports false on an error, in f.err.
func (f *flow) write(dst int, b []byte, isPending bool) bool {
	for len(b) > 0 {
		n, err := rawWrite(f.fd[dst], b)
		if n > 0 {
			f.bytes[dst] += int64(n)
			b = b[n:]
		}
		switch {
		case err == nil:
		case errors.Is(err, unix.EAGAIN):
			f.writable[dst] = false
			if isPending {
				f.pending[dst] = b
			} else {
				f.pending[dst] = append([]byte(nil), b...)
			}
			return false
		case errors.Is(err, unix.EINTR):
		default:
			f.err = fmt.Errorf("write: %w", err)
			return false
		}
	}
	return true
}

// passEOF forwards src's FIN once everything before it was written.
func (f *flow) passEOF(src int) {
	dst := 1 - src
	if f.done[src] || len(f.pending[dst]) > 0 {
		return
	}
	f.done[src] = true
	if err := rawShutdown(f.fd[dst], unix.SHUT_WR); err != nil && !errors.Is(err, unix.ENOTCONN) {
		f.err = fmt.Errorf("shutdown: %w", err)
	}
}

// finish closes both sockets once and reports the end to the owner.
func (f *flow) finish() {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	f.closed = true
	for side := range 2 {
		if f.fd[side] >= 0 {
			_ = closeFD(f.fd[side])
		}
	}
	f.mu.Unlock()
	if f.rp != nil {
		f.rp.stopTimer()
	}
	f.stopDialTimer()
	f.pending = [2][]byte{}
	f.onEnd(f.bytes[1], f.bytes[0], f.err)
}

// kill shuts both sockets down; the loop then sees both directions end
// and closes them. Safe from any goroutine.
func (f *flow) kill() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return
	}
	for side := range 2 {
		if f.fd[side] >= 0 {
			_ = rawShutdown(f.fd[side], unix.SHUT_RDWR)
		}
	}
}

// heard reports whether the upstream socket received data within d (see
// receivedWithin). Safe from any goroutine.
func (f *flow) heard(d time.Duration) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed || f.fd[1] < 0 {
		return false
	}
	return receivedOnFD(f.fd[1], d)
}

// detach duplicates c's socket descriptor and closes c, so that the socket
// lives on in the returned descriptor only, outside Go's poller.
func detach(c any) (int, error) {
	nfd, err := dupSocket(c)
	if err != nil {
		return -1, err
	}
	if cl, ok := c.(interface{ Close() error }); ok {
		_ = cl.Close()
	}
	return nfd, nil
}

// dupSocket returns a close-on-exec duplicate of c's socket descriptor.
func dupSocket(c any) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, fmt.Errorf("%T has no socket descriptor", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("raw socket: %w", err)
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, fmt.Errorf("raw socket: %w", err)
	}
	if derr != nil {
		return -1, fmt.Errorf("duplicate descriptor: %w", derr)
	}
	return nfd, nil
}

// newFlow makes a flow of the client's socket cfd (which it owns from now
// on, also on error) and the upstream socket of d (a connected net.Conn,
// whose socket it takes out of Go's poller, or a connecting descriptor);
// onEnd runs when the flow ends. rp is the replay state (nil: no replay).
func newFlow(cfd int, d dialed, rp *replayState, onEnd func(sent, received int64, err error)) (*flow, error) {
	ufd := d.fd
	if d.up != nil {
		var err error
		if ufd, err = detach(d.up); err != nil {
			return nil, fmt.Errorf("upstream: %w", err)
		}
	}
	return &flow{fd: [2]int{cfd, ufd}, rp: rp, onEnd: onEnd}, nil
}

// rawRead, rawWrite, rawEpollWait (with a zero timeout), rawEpollCtl,
// rawShutdown, rawSetsockoptInt and closeFD are the system calls of the
// data path, made without the runtime's system call bookkeeping: on
// non-blocking sockets without SO_LINGER none of them ever blocks. Besides saving that bookkeeping,
// this keeps the runtime's monitor thread asleep: every system call made
// the usual way after the process was idle wakes it into polling at its
// shortest period, which under request-response traffic, idle between
// requests, costs more than the requests.
func rawEpollWait(epfd int, events []unix.EpollEvent) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(unsafe.SliceData(events))), uintptr(len(events)), 0, 0, 0) //nolint:gosec // epfd is a descriptor
	if e != 0 {
		return 0, e
	}
	return int(r), nil //nolint:gosec // at most len(events)
}

func rawRead(fd int, b []byte) (int, error) {
	r, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b))) //nolint:gosec // fd is a descriptor
	if e != 0 {
		return 0, e
	}
	return int(r), nil //nolint:gosec // at most len(b)
}

func rawWrite(fd int, b []byte) (int, error) {
	r, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b))) //nolint:gosec // fd is a descriptor
	if e != 0 {
		return 0, e
	}
	return int(r), nil //nolint:gosec // at most len(b)
}

func rawEpollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0) //nolint:gosec // descriptors
	if e != 0 {
		return e
	}
	return nil
}

func rawShutdown(fd, how int) error {
	_, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), uintptr(how), 0) //nolint:gosec // a descriptor
	if e != 0 {
		return e
	}
	return nil
}

func rawSetsockoptInt(fd, level, opt, value int) error {
	v := int32(value)                                                                                                              //nolint:gosec // socket option values are small
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0) //nolint:gosec // a descriptor
	if e != 0 {
		return e
	}
	return nil
}

func closeFD(fd int) error {
	_, _, e := unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0) //nolint:gosec // a descriptor
	if e != 0 {
		return e
	}
	return nil
}

//go:build linux

package relay

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/extractedprism/extractedprism/pkg/proxy/internal/sys"
)

// readBytes is the size of each loop's shared read buffer (the most one
// peek takes), plainBytes the most one plain read takes, so the most a
// flow keeps for a side that is behind (see pump), and budget how many
// reads one side of a flow gets per turn before the loop serves other
// flows.
const (
	readBytes  = 64 << 10
	plainBytes = 16 << 10
	budget     = 4
	// clampRcvBuf is the SO_RCVBUF a flow gives a side's socket once the
	// other side first refused bytes (see clamp).
	clampRcvBuf = 256 << 10
	// notsentLowat is the TCP_NOTSENT_LOWAT of both of a flow's sockets:
	// a write is refused (EAGAIN) while more than this many bytes wait
	// unsent, whatever size the kernel's autotuning gives the send
	// buffer. A receiver that stops reading closes its window, every
	// byte then waits unsent, and without it the socket would hold up to
	// tcp_wmem's maximum (4 MiB) of them per flow. Bytes in flight are
	// not counted, so a long fat path is not slowed.
	notsentLowat = 128 << 10
)

// Config shapes a Relay; its zero value is the default.
type Config struct {
	// Loops is the number of event loops (default: one per GOMAXPROCS,
	// growing with it).
	Loops int
	// Wait replaces epoll_pwait (with a zero timeout) for loop number
	// loop, to inject failures (default sys.EpollWait).
	Wait func(loop, epfd int, events []unix.EpollEvent) (int, error)
}

// Relay is a set of event loops. Create it with New; Stop ends it.
type Relay struct {
	cfg   Config
	mu    sync.Mutex // guards loops and next
	loops []*loop
	next  uint32
	wg    sync.WaitGroup
	// failed is the first loop failure: that loop ended its flows and
	// takes no new ones (see Add).
	failed atomic.Pointer[LoopFailure]
}

// New starts a relay's loops; it fails only if the kernel refuses them.
func New(cfg Config) (*Relay, error) {
	r := &Relay{cfg: cfg}
	r.mu.Lock()
	err := r.grow(r.want())
	r.mu.Unlock()
	if err != nil {
		r.Stop()
		return nil, err
	}
	return r, nil
}

// want is the number of loops the relay should have: the configured
// number, or one per GOMAXPROCS (which may have grown since the start).
func (r *Relay) want() int {
	if r.cfg.Loops > 0 {
		return r.cfg.Loops
	}
	return max(1, runtime.GOMAXPROCS(0))
}

// grow starts loops until there are n; r.mu must be held.
func (r *Relay) grow(n int) error {
	for len(r.loops) < n {
		index := len(r.loops)
		wait := sys.EpollWait
		if r.cfg.Wait != nil {
			w := r.cfg.Wait
			wait = func(epfd int, events []unix.EpollEvent) (int, error) { return w(index, epfd, events) }
		}
		l, err := newLoop(wait)
		if err != nil {
			return err
		}
		l.died = func(err error) {
			r.mu.Lock()
			of := len(r.loops)
			r.mu.Unlock()
			r.failed.CompareAndSwap(nil, &LoopFailure{Index: index, Of: of, Err: err})
		}
		r.loops = append(r.loops, l)
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			l.run()
		}()
	}
	return nil
}

// Add gives f to the next loop, round robin, skipping loops that have
// died; f is then the loop's. It reports false if no loop takes f (all
// have died, or the relay stopped): f is still the caller's, to End.
func (r *Relay) Add(f *Flow) bool {
	if f.home != nil && f.home.add(f) {
		return true // back from a detach: to the same loop
	}
	r.mu.Lock()
	if n := r.want(); n > len(r.loops) {
		_ = r.grow(n) // a loop that cannot start now is tried again at the next Add
	}
	loops := r.loops
	start := r.next
	r.next++
	r.mu.Unlock()
	n := uint32(len(loops)) //nolint:gosec // a few loops
	for i := range n {
		if loops[(start+i)%n].add(f) {
			return true
		}
	}
	return false
}

// Err returns the first loop failure (a *LoopFailure), or nil.
func (r *Relay) Err() error {
	if lf := r.failed.Load(); lf != nil {
		return lf
	}
	return nil
}

// Stop ends every loop and waits for them. Flows still registered are
// ended with ErrStopped.
func (r *Relay) Stop() {
	r.mu.Lock()
	loops := r.loops
	r.mu.Unlock()
	for _, l := range loops {
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

	mu       sync.Mutex // guards queued, poked, stopping and closed, and wake against its close
	queued   []*Flow    // to register
	poked    []*Flow    // woken: tell their Handlers
	stopping bool
	closed   bool        // the loop has ended its flows and takes no more
	news     atomic.Bool // queued, poked or stopping changed since the loop looked
	died     func(error) // called once if the loop fails (not when stopped)

	// Owned by the loop goroutine.
	flows []*Flow // by slot
	free  []int32
	ready []*Flow // flows with work left after their budget
	buf   []byte
	wait  func(epfd int, events []unix.EpollEvent) (int, error)
}

func newLoop(wait func(int, []unix.EpollEvent) (int, error)) (*loop, error) {
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
	return &loop{epfd: epfd, ep: ep, file: file, wake: wake, buf: make([]byte, readBytes), wait: wait}, nil
}

// add queues f for the loop; it reports false if the loop has ended.
func (l *loop) add(f *Flow) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.queued = append(l.queued, f)
	l.news.Store(true)
	l.signal()
	return true
}

// poke asks the loop to tell f's Handler it was woken. A loop that has
// ended has ended f too.
func (l *loop) poke(f *Flow) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	l.poked = append(l.poked, f)
	l.news.Store(true)
	l.signal()
}

func (l *loop) stop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	l.stopping = true
	l.news.Store(true)
	l.signal()
}

// signal wakes the loop; l.mu must be held (the eventfd is closed under
// it when the loop ends).
func (l *loop) signal() {
	one := [8]byte{1}
	for {
		_, err := sys.Write(l.wake, one[:])
		if !errors.Is(err, unix.EINTR) {
			return // EAGAIN: the counter is full, a wake is pending anyway
		}
	}
}

func (l *loop) run() {
	defer func() { _ = l.file.Close() }()
	events := make([]unix.EpollEvent, 128)
	done := false
	// The whole loop runs inside one RawRead: turn returns false to park
	// in Go's poller until epfd has events, true when the loop ends. An
	// event that comes while a turn runs marks epfd ready, so the next
	// wait returns at once and nothing is missed.
	err := l.ep.Read(func(fd uintptr) bool {
		for {
			n, err := l.wait(int(fd), events)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				// Cannot happen with a valid epfd and buffer; end every
				// flow rather than spin, and say so.
				l.fail(fmt.Errorf("epoll_pwait: %w", err))
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
		l.fail(fmt.Errorf("wait in Go's poller: %w", err))
	}
}

// fail ends the loop after an error of its own; the failure is recorded
// before the flows end, so that whoever sees them end can see why.
func (l *loop) fail(err error) {
	if l.died != nil {
		l.died(err)
	}
	l.shutdown()
}

// turn handles one batch of events, the flows left over from the last
// turn, and new flows. It reports true when the loop has been stopped and
// has ended its flows.
func (l *loop) turn(events []unix.EpollEvent) bool {
	for i := range events {
		ev := &events[i]
		if ev.Fd < 0 {
			var b [8]byte
			_, _ = sys.Read(l.wake, b[:])
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
		l.woken(f)
	}
	if stopping {
		l.shutdown()
		return true
	}
	return false
}

// register takes f into the loop: a slot, then both sockets in epoll.
func (l *loop) register(f *Flow) {
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
		_ = sys.SetsockoptInt(f.fd[side], unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, notsentLowat)
		ev := unix.EpollEvent{
			Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET,
			Fd:     f.slot,
			Pad:    int32(side), //nolint:gosec // 0 or 1
		}
		if err := sys.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, f.fd[side], &ev); err != nil {
			f.err = fmt.Errorf("epoll_ctl: %w", err)
			l.end(f)
			return
		}
	}
	f.mu.Lock()
	f.loop = l
	f.mu.Unlock()
	if f.wakes.Load() {
		l.woken(f) // woken while out of the loop
		if l.flows[f.slot] != f {
			return
		}
	}
	l.serve(f)
}

// woken tells f's Handler it was woken, if f is (still) in this loop.
func (l *loop) woken(f *Flow) {
	f.mu.Lock()
	mine := f.loop == l
	f.mu.Unlock()
	if !mine || l.flows[f.slot] != f || !f.wakes.Swap(false) {
		return
	}
	l.apply(f, f.h.Woken(f))
}

// apply carries out a Handler's verdict on f, which is in this loop.
func (l *loop) apply(f *Flow, v Verdict) {
	switch v.act {
	case actDetach:
		l.detach(f)
	case actEnd:
		f.err = v.err
		l.end(f)
	case actContinue:
	}
}

// detach takes f out of the loop without closing its sockets and hands it
// to its Handler; f comes back through Relay.Add.
func (l *loop) detach(f *Flow) {
	for side := range 2 {
		if f.fd[side] >= 0 {
			_ = sys.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, f.fd[side], &unix.EpollEvent{})
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
	f.h.Detached(f)
}

// shutdown ends every flow still in the loop, and the loop: from now on
// add refuses flows and nobody signals its eventfd, which it closes.
func (l *loop) shutdown() {
	l.mu.Lock()
	queued := l.queued
	l.queued, l.poked = nil, nil
	l.closed = true
	_ = unix.Close(l.wake)
	l.mu.Unlock()
	for _, f := range queued {
		f.End(ErrStopped)
	}
	for _, f := range l.flows {
		if f != nil {
			f.err = ErrStopped
			l.end(f)
		}
	}
}

// serve moves bytes both ways as far as the sockets allow, then ends f if
// both directions are done or a socket failed, or carries out what its
// Handler decided.
func (l *loop) serve(f *Flow) {
	if f.connecting && !l.connected(f) {
		return
	}
	more := f.pump(l.buf, 0) // client to upstream
	if f.verdict.act == actContinue {
		more = f.pump(l.buf, 1) || more
	}
	if v := f.verdict; v.act != actContinue {
		f.verdict = Continue
		l.apply(f, v)
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

// connected checks a connecting flow whose sockets had an event: it
// reports true once the upstream is connected and the Handler lets the
// flow go on.
func (l *loop) connected(f *Flow) bool {
	if f.killed.Load() {
		f.err = ErrKilled
		l.end(f)
		return false
	}
	if !f.writable[1] && !f.hup[1] {
		return false // still connecting
	}
	err := sys.ConnectResult(f.fd[1])
	v := f.h.Connected(f, err)
	if err == nil && v.act == actContinue {
		f.connecting = false
		return true
	}
	if v.act == actContinue {
		v = End(err)
	}
	l.apply(f, v)
	return false
}

// end closes f's sockets and frees its slot, then tells its Handler.
func (l *loop) end(f *Flow) {
	if l.flows[f.slot] == f {
		l.flows[f.slot] = nil
		l.free = append(l.free, f.slot)
	}
	f.finish()
}

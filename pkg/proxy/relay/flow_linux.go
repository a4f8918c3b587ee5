//go:build linux

package relay

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/extractedprism/extractedprism/pkg/proxy/internal/sys"
)

// ErrKilled ends a flow that was killed while its upstream connected.
var ErrKilled = errors.New("killed")

// Flow is one connection in a relay. Side 0 is the client, side 1 the
// upstream.
type Flow struct {
	// fd[0] is the client's socket, fd[1] the upstream's (-1 while
	// detached without one). Changed only under mu.
	fd [2]int
	h  Handler

	mu     sync.Mutex // guards fd, closed and loop against Kill, Wake and WithSockets
	closed bool
	loop   *loop // the loop f is registered with; nil while detached

	wakes  atomic.Bool // Wake was called since the Handler heard Woken
	killed atomic.Bool

	// Owned by the flow's owner: its loop, or the Handler while detached.
	home       *loop // the loop f belongs to, also while detached
	connecting bool  // fd[1]'s connect is under way
	watching   bool  // before the upstream's first byte (see Watch)
	verdict    Verdict
	slot       int32
	queued     bool
	readable   [2]bool // side may have bytes (or EOF) to read
	hup        [2]bool // side's peer closed: read until EOF, not just a short read
	writable   [2]bool // side's send buffer may take bytes
	congested  [2]bool // side refused bytes and has not taken a whole write since
	clamped    [2]bool // side's receive buffer is clampRcvBuf (see clamp)
	// pending[s] holds bytes read for side s that it could not take yet:
	// at most plainBytes, or the bytes to resend to a new upstream.
	pending [2][]byte
	// eof[s]: side s has sent FIN; done[s]: everything from side s has
	// been written to the other side and the FIN passed on.
	eof   [2]bool
	done  [2]bool
	bytes [2]int64 // bytes written to each side
	err   error
}

// NewFlow makes a flow of the client's socket cfd and the upstream's ufd,
// non-blocking descriptors that it owns from now on; h hears its events.
// Give it to a loop with Relay.Add.
func NewFlow(cfd, ufd int, h Handler) *Flow {
	return &Flow{fd: [2]int{cfd, ufd}, h: h}
}

// Connecting says that the upstream socket's connect is still under way:
// the flow waits for it and tells its Handler (Connected). Owner only.
func (f *Flow) Connecting() { f.connecting = true }

// Watch makes the flow report the client's bytes and the upstream's
// failures to its Handler until the upstream's first byte. Owner only.
func (f *Flow) Watch() { f.watching = true }

// Sent returns the bytes written to the current upstream. Owner only.
func (f *Flow) Sent() int64 { return f.bytes[1] }

// ClientClosed reports whether the client has sent its FIN. Owner only.
func (f *Flow) ClientClosed() bool { return f.eof[0] }

// ReplaceUpstream gives a detached flow a new upstream socket ufd (closing
// the old one, if any), connecting or not, with resend to be written to
// it first; the client's FIN, if it came, is passed on again after it.
// Owner only, while detached.
func (f *Flow) ReplaceUpstream(ufd int, connecting bool, resend []byte) {
	f.CloseUpstream()
	f.mu.Lock()
	f.fd[1] = ufd
	f.mu.Unlock()
	f.connecting = connecting
	f.bytes[1] = 0
	f.eof[1], f.done[1], f.hup[1], f.congested[1], f.clamped[1] = false, false, false, false, false
	f.pending[1] = resend
	f.done[0] = false
}

// CloseUpstream closes a detached flow's upstream socket. Owner only,
// while detached.
func (f *Flow) CloseUpstream() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fd[1] >= 0 {
		_ = sys.Close(f.fd[1])
		f.fd[1] = -1
	}
}

// End closes a flow that is in no loop (detached, or never added) and
// tells its Handler. Owner only.
func (f *Flow) End(err error) {
	f.err = err
	f.finish()
}

// Kill shuts both sockets down; the loop then sees both directions end
// and closes them. Safe from any goroutine.
func (f *Flow) Kill() {
	f.killed.Store(true)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return
	}
	for side := range 2 {
		if f.fd[side] >= 0 {
			_ = sys.Shutdown(f.fd[side], unix.SHUT_RDWR)
		}
	}
}

// Wake makes the flow's loop call its Handler's Woken (at once if it is
// in a loop, when it comes back if detached). Safe from any goroutine.
func (f *Flow) Wake() {
	f.wakes.Store(true)
	f.mu.Lock()
	l := f.loop
	f.mu.Unlock()
	if l != nil {
		l.poke(f)
	}
}

// WithSockets calls fn with the client's and the upstream's descriptors
// (the upstream's -1 while there is none), which stay open during the
// call, and returns its answer; false once the flow has ended. Safe from
// any goroutine; fn must not block.
func (f *Flow) WithSockets(fn func(client, upstream int) bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	return fn(f.fd[0], f.fd[1])
}

// pump moves bytes from side src to the other side. It reports whether src
// still has bytes to read after using its budget.
//
// Memory: the loop keeps bytes of its own for a side only when that side
// could not take a plain read's bytes, at most plainBytes of them. Bytes
// go across in one of two ways:
//   - a plain read of at most plainBytes, written at once; what the
//     destination does not take is kept in pending (the fast path: one
//     read and one write, and any request or answer that fits in one);
//   - a peek of up to the loop's whole buffer, written at once, and only
//     what was written is then taken from the source (Discard): the rest
//     stays in the source socket's receive queue, where the kernel's flow
//     control pushes back on the sender, and costs the loop nothing.
//
// A turn's first read is plain unless the destination is congested (it
// refused bytes and has not taken a whole write since); the reads after a
// full plain read, and all reads towards a congested side, peek. So a
// slow reader costs at most plainBytes once, when it first falls behind,
// and nothing after its pending bytes went out.
func (f *Flow) pump(buf []byte, src int) bool {
	dst := 1 - src
	if f.done[src] || f.err != nil {
		return false
	}
	if len(f.pending[dst]) > 0 {
		if !f.writable[dst] || !f.write(dst, f.pending[dst], true) {
			if dst == 1 && f.err != nil && f.watching {
				f.upstreamFailed(f.err)
			}
			return false
		}
		f.pending[dst] = nil
	}
	peek := f.congested[dst]
	for range budget {
		if f.eof[src] {
			f.passEOF(src)
			return false
		}
		if !f.readable[src] {
			return false
		}
		b := buf
		var n int
		var err error
		if peek {
			n, err = sys.Peek(f.fd[src], b)
		} else {
			b = buf[:min(len(buf), plainBytes)]
			n, err = sys.Read(f.fd[src], b)
		}
		switch {
		case errors.Is(err, unix.EAGAIN):
			f.readable[src] = false
			return false
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			f.err = fmt.Errorf("read: %w", err)
			if src == 1 && f.watching {
				f.upstreamFailed(err)
			}
			return false
		case n == 0:
			if src == 1 && f.watching && f.upstreamFailed(io.EOF) {
				return false
			}
			f.eof[src] = true
			continue
		}
		if f.watching && src == 1 {
			f.watching = false
			f.h.FirstByte(f)
		}
		if n < len(b) && !f.hup[src] {
			// A short read took everything the socket held; a later
			// arrival raises a new edge. A FIN already flagged must still
			// be read, so a hung-up side reads on until EOF.
			f.readable[src] = false
		}
		var ok bool
		if peek {
			ok = f.forward(src, b[:n])
		} else {
			if f.watching && src == 0 {
				f.h.ClientBytes(f, b[:n])
			}
			ok = f.write(dst, b[:n], false)
		}
		if !ok {
			if dst == 1 && f.err != nil && f.watching {
				f.upstreamFailed(f.err)
			}
			return false
		}
		peek = peek || n == len(b)
	}
	return f.readable[src] || (f.eof[src] && !f.done[src])
}

// forward writes b, peeked from side src, to the other side and takes
// from src what was written; it reports false if not all of b went (the
// rest is still in src's receive queue) or on an error, in f.err.
func (f *Flow) forward(src int, b []byte) bool {
	dst := 1 - src
	w, ok := f.writeSome(dst, b)
	if w > 0 {
		if f.watching && src == 0 {
			f.h.ClientBytes(f, b[:w])
		}
		if d, err := sys.Discard(f.fd[src], b[:w]); err != nil || d != w {
			if err == nil {
				err = fmt.Errorf("took %d of %d peeked bytes", d, w)
			}
			f.err = fmt.Errorf("read: %w", err)
			return false
		}
	}
	if w < len(b) {
		// What was peeked and not written is read again later.
		f.readable[src] = true
	}
	return ok
}

// upstreamFailed asks the Handler what an upstream failure before its
// first byte means (err: the error, io.EOF for a close). It reports true
// if the Handler took the flow (serve then carries out its verdict, and
// the failure is forgotten); false if the failure goes on to the client.
func (f *Flow) upstreamFailed(err error) bool {
	v := f.h.UpstreamFailed(f, err)
	if v.act == actContinue {
		f.watching = false
		return false
	}
	f.err = nil
	f.verdict = v
	return true
}

// write writes b to side dst. Whatever the socket does not take now is
// kept in pending[dst] (copied, unless b is pending[dst] already), and
// write reports false; it also reports false on an error, in f.err.
func (f *Flow) write(dst int, b []byte, isPending bool) bool {
	w, ok := f.writeSome(dst, b)
	if ok || f.err != nil {
		return ok
	}
	if isPending {
		f.pending[dst] = b[w:]
	} else {
		f.pending[dst] = append([]byte(nil), b[w:]...)
	}
	return false
}

// writeSome writes as much of b to side dst as its socket takes now and
// returns how much that was; ok is true when it took all of b. A refusal
// (EAGAIN) marks dst not writable and congested; an error is kept in
// f.err. A whole write ends dst's congestion.
func (f *Flow) writeSome(dst int, b []byte) (int, bool) {
	w := 0
	for w < len(b) {
		n, err := sys.Write(f.fd[dst], b[w:])
		if n > 0 {
			f.bytes[dst] += int64(n)
			w += n
		}
		switch {
		case err == nil:
		case errors.Is(err, unix.EAGAIN):
			f.writable[dst] = false
			f.congested[dst] = true
			f.clamp(1 - dst)
			return w, false
		case errors.Is(err, unix.EINTR):
		default:
			f.err = fmt.Errorf("write: %w", err)
			return w, false
		}
	}
	f.congested[dst] = false
	return w, true
}

// clamp fixes side src's receive buffer at clampRcvBuf the first time the
// other side refuses bytes. Bytes the relay does not take stay in src's
// receive queue (see pump), and the kernel's autotuning would otherwise
// let that queue grow to tcp_rmem's maximum (32 MiB on recent kernels)
// for every client that falls behind: memory of the node's (cgroup v1)
// or of the daemon's own cgroup (v2), which no limit of the daemon
// bounds. Fixed, the buffer still carries clampRcvBuf per round trip, so
// a flow that speeds up again is not starved. One setsockopt per side
// and socket, only on a flow's first congestion; a failure keeps the
// kernel's autotuning.
func (f *Flow) clamp(src int) {
	if f.clamped[src] {
		return
	}
	f.clamped[src] = true
	_ = sys.SetsockoptInt(f.fd[src], unix.SOL_SOCKET, unix.SO_RCVBUF, clampRcvBuf)
}

// passEOF forwards src's FIN once everything before it was written.
func (f *Flow) passEOF(src int) {
	dst := 1 - src
	if f.done[src] || len(f.pending[dst]) > 0 {
		return
	}
	f.done[src] = true
	if err := sys.Shutdown(f.fd[dst], unix.SHUT_WR); err != nil && !errors.Is(err, unix.ENOTCONN) {
		f.err = fmt.Errorf("shutdown: %w", err)
	}
}

// finish closes both sockets once and tells the Handler.
func (f *Flow) finish() {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	f.closed = true
	for side := range 2 {
		if f.fd[side] >= 0 {
			_ = sys.Close(f.fd[side])
		}
	}
	f.mu.Unlock()
	f.pending = [2][]byte{}
	f.h.Ended(f, f.bytes[1], f.bytes[0], f.err)
}

package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// Replay before the first upstream byte.
//
// Until the upstream has sent a byte, the client's bytes are forwarded and
// also kept (up to ReplayBufferBytes). If the upstream then fails (EOF or
// reset after the client's first bytes), the failure is reported to the
// upstream set as a passive one, the next upstream is dialled and the kept
// bytes are sent again: the client sees a short delay instead of an error.
// Silence for FirstByteTimeout after the client's first bytes is reported
// the same way, but the handshake moves only to an upstream that is up and
// answered its last probe: when there is none, every apiserver is slow,
// and the connection keeps waiting for the one it has.
//
// An upstream that closes a connection on which the client has sent
// nothing is not failing: it is an apiserver timing out an idle client
// (kube-apiserver's handshake timeout). The close is passed on to the
// client and nothing is reported.
//
// This is only done when the kept bytes are TLS handshake records (record
// type 22, plus change_cipher_spec 20): a TLS client without 0-RTT early
// data sends no application data before the server's first flight, so
// nothing the client asked for can have reached the failed apiserver.
// Any other record type (application data 23, i.e. 0-RTT, or non-TLS
// bytes) makes the connection non-replayable, and it fails as it would
// without a balancer. Once the first upstream byte arrives the kept bytes
// are dropped, both goroutines stop and the connection is handed to the
// relay (establish).

var bufPool = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

// session is the state shared by the two copy directions of one
// connection during the replay phase.
type session struct {
	s    *Server
	o    *Options
	c    *conn
	mu   sync.Mutex
	up   net.Conn
	u    *upstream.Upstream
	kept []byte
	// replayable is true while kept holds only TLS handshake records.
	replayable bool
	// forwarded counts client bytes written to the current upstream.
	forwarded int
	// fromClient counts bytes the client has sent on this connection.
	fromClient int
	answered   bool
	clientEOF  bool
	clientErr  error
	fbTimer    *time.Timer
	// fbExpired marks the upstream whose first-byte deadline passed.
	fbExpired net.Conn
	sent      int64
}

// pipeReplay runs the replay phase of c and reports whether c was handed
// to the relay (which then owns it); if not, c has ended.
func (s *Server) pipeReplay(o *Options, c *conn, up net.Conn, u *upstream.Upstream, tried map[*upstream.Upstream]bool) bool {
	ss := &session{s: s, o: o, c: c, up: up, u: u, replayable: true}
	c.replaying.Store(true)
	defer c.replaying.Store(false)
	clientDone := make(chan struct{})
	go ss.clientLoop(clientDone)
	received, answered := ss.upstreamLoop(tried)
	<-clientDone
	ss.mu.Lock()
	if ss.fbTimer != nil {
		ss.fbTimer.Stop()
	}
	up, u, sent, clientEOF, clientErr := ss.up, ss.u, ss.sent, ss.clientEOF, ss.clientErr
	ss.mu.Unlock()
	if answered && clientErr == nil {
		s.establish(o, c, u, up, handoff{clientEOF: clientEOF, sent: sent, received: received})
		return true
	}
	_ = up.Close()
	u.Release()
	o.Observer.ConnClosed(u, sent, received)
	o.Logger.Debug("connection closed", "client", c.client.RemoteAddr().String(), "upstream", u.Addr(),
		"sent", sent, "received", received, "reason", c.killReason())
	return false
}

// clientLoop copies client to upstream until the upstream's first byte,
// keeping what it forwards; upstreamLoop then stops it with a read
// deadline.
func (ss *session) clientLoop(done chan<- struct{}) {
	defer close(done)
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	client := ss.c.client
	for {
		ss.mu.Lock()
		answered := ss.answered
		ss.mu.Unlock()
		if answered {
			return
		}
		n, rerr := client.Read(buf)
		if n > 0 {
			ss.forward(buf[:n])
		}
		if rerr != nil {
			ss.mu.Lock()
			answered := ss.answered
			ss.mu.Unlock()
			if answered && errors.Is(rerr, os.ErrDeadlineExceeded) {
				return // stopped for the handoff
			}
			ss.mu.Lock()
			if errors.Is(rerr, io.EOF) && ss.clientErr == nil {
				ss.clientEOF = true
				if cw, ok := ss.up.(closeWriter); ok {
					_ = cw.CloseWrite()
				}
			} else {
				ss.clientErr = rerr
				_ = ss.up.Close()
			}
			ss.mu.Unlock()
			return
		}
	}
}

// forward writes client bytes to the current upstream, keeping them for
// replay while no upstream byte has come back.
func (ss *session) forward(b []byte) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.fromClient += len(b)
	if !ss.answered {
		if ss.replayable && len(ss.kept)+len(b) <= ss.o.ReplayBufferBytes {
			ss.kept = append(ss.kept, b...)
			ss.replayable = tlsHandshakeOnly(ss.kept)
		} else {
			ss.replayable = false
		}
		if !ss.replayable {
			ss.kept = nil
		}
		ss.armFirstByteTimer()
	}
	// Written under the lock so that a replay cannot interleave with it.
	n, err := ss.up.Write(b)
	ss.sent += int64(n)
	ss.forwarded += n
	if err != nil && (ss.answered || !ss.replayable) {
		_ = ss.up.Close()
		_ = ss.c.client.Close()
	}
}

// armFirstByteTimer starts the first-byte deadline of the current
// upstream at its first forwarded client byte; ss.mu must be held.
func (ss *session) armFirstByteTimer() {
	if ss.o.FirstByteTimeout <= 0 || ss.fbTimer != nil {
		return
	}
	up := ss.up
	ss.fbTimer = time.AfterFunc(ss.o.FirstByteTimeout, func() {
		ss.mu.Lock()
		defer ss.mu.Unlock()
		if !ss.answered && ss.up == up {
			ss.fbExpired = up
			_ = up.SetReadDeadline(time.Now())
		}
	})
}

// upstreamLoop waits for the first upstream byte, replaying to other
// upstreams on failure, passes it to the client and stops clientLoop. It
// returns the bytes received from upstreams and whether the upstream
// answered and the client took the answer (the connection is then ready
// for the relay).
func (ss *session) upstreamLoop(tried map[*upstream.Upstream]bool) (int64, bool) {
	client := ss.c.client
	bp := bufPool.Get().(*[]byte)
	buf := *bp
	for {
		ss.mu.Lock()
		up, u := ss.up, ss.u
		ss.mu.Unlock()
		n, err := up.Read(buf)
		if n > 0 {
			ss.mu.Lock()
			ss.answered = true
			ss.c.replaying.Store(false)
			ss.kept = nil
			if ss.fbTimer != nil {
				ss.fbTimer.Stop()
				ss.fbTimer = nil
			}
			ss.mu.Unlock()
			_ = client.SetReadDeadline(time.Now()) // stops clientLoop
			_, werr := client.Write(buf[:n])
			bufPool.Put(bp)
			if werr != nil {
				_ = up.Close()
				_ = client.Close()
				return int64(n), false
			}
			return int64(n), true
		}
		// The upstream failed before its first byte.
		ss.mu.Lock()
		if ss.c.killReason() != "" || ss.clientErr != nil {
			ss.mu.Unlock()
			bufPool.Put(bp)
			_ = client.Close()
			return 0, false
		}
		moved := ss.c.movedByBalancer(up)
		if !moved && (ss.clientEOF || ss.fromClient == 0) {
			// The client closed its side first (a port check, a client
			// giving up), or never sent a byte and the upstream timed it
			// out: the upstream's close answers the client and says
			// nothing about its health. Pass it on.
			ss.mu.Unlock()
			bufPool.Put(bp)
			if cw, ok := client.(closeWriter); ok && errors.Is(err, io.EOF) && cw.CloseWrite() == nil {
				return 0, false
			}
			_ = client.Close()
			return 0, false
		}
		if !ss.replayable && ss.forwarded > 0 {
			ss.mu.Unlock()
			bufPool.Put(bp)
			if errors.Is(err, io.EOF) {
				if cw, ok := client.(closeWriter); ok && cw.CloseWrite() == nil {
					return 0, false
				}
			}
			_ = client.Close()
			return 0, false
		}
		timedOut := ss.fbExpired == up
		reason := firstByteFailure(err, timedOut, moved, ss.o.FirstByteTimeout)
		if !moved {
			kind := failure.Classify(err)
			if timedOut {
				kind = failure.Timeout
			}
			ss.o.Observer.DialFailed(u, kind)
			ss.s.set.Passive(u, reason)
		}
		failedOverBefore := len(tried) > 1
		next, nu, derr := ss.s.dialNext(ss.o, ss.c, tried, timedOut)
		if derr != nil && timedOut && ss.c.killReason() == "" {
			// No other upstream is up and answering: all are slow. Keep
			// waiting for this one, without a deadline now.
			ss.fbExpired = nil
			_ = up.SetReadDeadline(time.Time{})
			ss.mu.Unlock()
			ss.o.Logger.Debug("no other upstream is up; waiting for a slow upstream", "upstream", u.Addr())
			continue
		}
		_ = up.Close()
		if derr != nil {
			ss.mu.Unlock()
			bufPool.Put(bp)
			if ss.c.killReason() == "" {
				ss.o.Observer.NoUpstream()
				ss.s.rlog.Log(context.Background(), slog.LevelWarn, "no-upstream", "client connection closed: no upstream reachable",
					"reason", fmt.Errorf("%s, then: %w", reason, derr))
			}
			_ = client.Close()
			return 0, false
		}
		if !failedOverBefore {
			ss.o.Observer.Failover()
		}
		ss.o.Observer.Replayed()
		ss.o.Logger.Debug("replaying handshake", "from", u.Addr(), "to", nu.Addr(), "bytes", len(ss.kept), "reason", reason)
		u.Release()
		ss.o.Observer.ConnClosed(u, ss.sent, 0)
		ss.o.Observer.ConnOpened(nu)
		ss.up, ss.u, ss.sent, ss.forwarded = next, nu, 0, 0
		if ss.fbTimer != nil {
			ss.fbTimer.Stop()
			ss.fbTimer = nil
		}
		if len(ss.kept) > 0 {
			w, werr := next.Write(ss.kept)
			ss.sent, ss.forwarded = int64(w), w
			if werr == nil {
				ss.armFirstByteTimer()
			}
		}
		if ss.clientEOF {
			if cw, ok := next.(closeWriter); ok {
				_ = cw.CloseWrite()
			}
		}
		alive := ss.s.assign(ss.c, nu, next)
		ss.mu.Unlock()
		if !alive {
			_ = next.Close()
		}
	}
}

func firstByteFailure(err error, timedOut, moved bool, fbt time.Duration) string {
	switch {
	case moved:
		return "moved off a down upstream"
	case timedOut:
		return fmt.Sprintf("no answer within first_byte_timeout %s", fbt)
	case errors.Is(err, io.EOF):
		return "closed the connection before answering"
	default:
		return fmt.Sprintf("failed before answering: %v", err)
	}
}

// tlsHandshakeOnly reports whether b is a sequence of TLS records of type
// handshake (22) or change_cipher_spec (20), the last possibly incomplete.
func tlsHandshakeOnly(b []byte) bool {
	for len(b) > 0 {
		if b[0] != 22 && b[0] != 20 {
			return false
		}
		if len(b) >= 2 && b[1] != 3 { // TLS major version is always 3
			return false
		}
		if len(b) < 5 {
			return true
		}
		n := int(b[3])<<8 | int(b[4])
		if len(b) < 5+n {
			return true
		}
		b = b[5+n:]
	}
	return true
}

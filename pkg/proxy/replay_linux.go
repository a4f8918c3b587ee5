//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// replayWhy says why a flow leaves its loop for a replay.
type replayWhy uint8

const (
	whyNone     replayWhy = iota
	whyFailed             // the upstream failed before its first byte
	whyTimedOut           // its first-byte deadline passed
	whyMoved              // the balancer moves the connection off it
)

// Nudge flags: set from other goroutines, read by the flow's loop.
const (
	nudgeMoved   uint32 = 1 << iota // CloseUpstream moves a waiting connection
	nudgeExpired                    // the first-byte deadline passed
)

var errMoved = errors.New("moved off a down upstream")

// replayState is a flow's state until its upstream's first byte. It
// belongs to the flow's owner (loop or replay goroutine) like the flow's
// own fields.
type replayState struct {
	s *Server
	o *Options
	c *conn
	// tried holds every upstream dialled for this connection.
	tried map[*upstream.Upstream]bool
	// kept holds the client's bytes while they are TLS handshake records
	// only (replayable) and fit ReplayBufferBytes.
	kept       []byte
	replayable bool
	fromClient int
	// gen counts the upstreams tried; a deadline of an earlier one is
	// ignored.
	gen   uint32
	timer *time.Timer
	// patient: the first-byte deadline passed while no other upstream
	// answered, so the connection waits for this one without a deadline.
	patient bool
}

func newReplayState(s *Server, o *Options, c *conn, tried map[*upstream.Upstream]bool) *replayState {
	return &replayState{s: s, o: o, c: c, tried: tried, replayable: true}
}

// keep records client bytes read during the replay phase.
func (rp *replayState) keep(b []byte) {
	rp.fromClient += len(b)
	if rp.replayable && len(rp.kept)+len(b) <= rp.o.ReplayBufferBytes {
		rp.kept = append(rp.kept, b...)
		rp.replayable = tlsHandshakeOnly(rp.kept)
	} else {
		rp.replayable = false
	}
	if !rp.replayable {
		rp.kept = nil
	}
}

func (rp *replayState) stopTimer() {
	if rp.timer != nil {
		rp.timer.Stop()
		rp.timer = nil
	}
}

// armFirstByte starts the current upstream's first-byte deadline at the
// first client byte written to it.
func (f *flow) armFirstByte() {
	rp := f.rp
	if rp.o.FirstByteTimeout <= 0 || rp.timer != nil || rp.patient || f.bytes[1] == 0 {
		return
	}
	gen := rp.gen
	rp.timer = time.AfterFunc(rp.o.FirstByteTimeout, func() {
		f.expiredGen.Store(gen)
		f.nudge(nudgeExpired)
	})
}

// answered ends the replay phase at the upstream's first byte.
func (f *flow) answered() {
	f.rp.stopTimer()
	f.rp.c.replaying.Store(false)
	f.rp = nil
}

// upstreamFailed handles a failure of the upstream before its first byte
// (err: the read or write error, or io.EOF). It reports true if the flow
// goes to a replay (pump then stops); false if the failure is passed on
// to the client as it would be without a balancer: the client closed its
// side first (a port check, a client giving up), or never sent a byte and
// the upstream timed it out (kube-apiserver's handshake timeout), or the
// client's bytes cannot be replayed, or the connection is being closed.
func (f *flow) upstreamFailed(err error) bool {
	rp := f.rp
	if rp.c.killReason() != "" || f.eof[0] || rp.fromClient == 0 || (!rp.replayable && f.bytes[1] > 0) {
		f.answered()
		return false
	}
	f.replayWhy, f.replayCause = whyFailed, err
	return true
}

// nudge sets a flag for f's loop and wakes it. Safe from any goroutine; a
// flow out for a replay sees its flags when it comes back.
func (f *flow) nudge(flag uint32) {
	f.nudges.Or(flag)
	f.mu.Lock()
	l := f.loop
	f.mu.Unlock()
	if l != nil {
		l.poke(f)
	}
}

// nudged acts on f's nudge flags, if f is (still) in this loop.
func (l *loop) nudged(f *flow) {
	f.mu.Lock()
	mine := f.loop == l
	f.mu.Unlock()
	if !mine || l.flows[f.slot] != f {
		return
	}
	flags := f.nudges.Swap(0)
	rp := f.rp
	if rp == nil || flags == 0 {
		return // answered meanwhile
	}
	switch {
	case flags&nudgeMoved != 0:
		f.replayWhy, f.replayCause = whyMoved, errMoved
	case flags&nudgeExpired != 0 && f.expiredGen.Load() == rp.gen && !rp.patient && rp.timer != nil:
		rp.timer = nil
		if f.eof[0] || !rp.replayable {
			// Nothing to replay: the connection fails as it would
			// without a balancer.
			f.err = fmt.Errorf("no answer within first_byte_timeout %s", rp.o.FirstByteTimeout)
			l.end(f)
			return
		}
		f.replayWhy, f.replayCause = whyTimedOut, nil
	default:
		return
	}
	l.toReplay(f)
}

// moveOff asks f's loop to move it off its upstream if it is still
// waiting for the upstream's first byte.
func (f *flow) moveOff() { f.nudge(nudgeMoved) }

// replayFlow runs in a goroutine of its own while f is out of its loop: it
// reports the failure, dials the next upstream and sends f back to its
// loop with the kept bytes pending for the new upstream; or ends f when
// no upstream is left. A first-byte deadline moves the connection only to
// an upstream that is up and answers its probes: when there is none,
// every apiserver is slow, and f goes back to wait for the one it has.
func (s *Server) replayFlow(f *flow) {
	rp, why, cause := f.rp, f.replayWhy, f.replayCause
	f.replayWhy, f.replayCause = whyNone, nil
	o, c := rp.o, rp.c
	u := c.upstream()
	moved, timedOut := why == whyMoved, why == whyTimedOut
	reason := firstByteFailure(cause, timedOut, moved, o.FirstByteTimeout)
	if !moved {
		kind := failure.Timeout
		if !timedOut {
			kind = failure.Classify(cause)
		}
		o.Observer.DialFailed(u, kind)
		s.set.Passive(u, reason)
	}
	failedOverBefore := len(rp.tried) > 1
	next, nu, derr := s.dialNext(o, c, rp.tried, timedOut)
	if derr != nil && timedOut && c.killReason() == "" {
		rp.patient = true
		o.Logger.Debug("no other upstream is up; waiting for a slow upstream", "upstream", u.Addr())
		f.home.add(f)
		return
	}
	f.mu.Lock()
	if f.fd[1] >= 0 {
		_ = closeFD(f.fd[1])
		f.fd[1] = -1
	}
	f.mu.Unlock()
	if derr != nil {
		if c.killReason() == "" {
			o.Observer.NoUpstream()
			s.rlog.Log(context.Background(), slog.LevelWarn, "no-upstream", "client connection closed: no upstream reachable",
				"reason", fmt.Errorf("%s, then: %w", reason, derr))
		}
		f.err = derr
		f.finish()
		return
	}
	if !failedOverBefore {
		o.Observer.Failover()
	}
	o.Observer.Replayed()
	o.Logger.Debug("replaying handshake", "from", u.Addr(), "to", nu.Addr(), "bytes", len(rp.kept), "reason", reason)
	u.Release()
	o.Observer.ConnClosed(u, f.bytes[1], 0)
	o.Observer.ConnOpened(nu)
	alive := s.assign(c, nu, next)
	nfd, err := detach(next)
	if err != nil {
		f.err = fmt.Errorf("upstream: %w", err)
		f.finish()
		return
	}
	f.mu.Lock()
	f.fd[1] = nfd
	f.mu.Unlock()
	// The new upstream starts from the kept handshake, and gets the
	// client's FIN again after it.
	rp.gen++
	f.bytes[1] = 0
	f.pending[1] = append([]byte(nil), rp.kept...)
	f.eof[1], f.done[1], f.hup[1] = false, false, false
	f.done[0] = false
	if !alive {
		f.kill()
	}
	f.home.add(f)
}

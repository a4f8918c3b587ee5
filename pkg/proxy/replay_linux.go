//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
)

// replayWhy says why a flow leaves its loop for a replay.
type replayWhy uint8

const (
	whyNone       replayWhy = iota
	whyFailed               // the upstream failed before its first byte
	whyTimedOut             // its first-byte deadline passed
	whyMoved                // the balancer moves the connection off it
	whyDialFailed           // its connect failed or timed out
)

// Nudge flags: set from other goroutines, read by the flow's loop.
const (
	nudgeMoved       uint32 = 1 << iota // CloseUpstream moves a waiting connection
	nudgeExpired                        // the first-byte deadline passed
	nudgeDialTimeout                    // the connect deadline passed
)

var errMoved = errors.New("moved off a down upstream")

// replayState is a flow's state until its upstream's first byte. It
// belongs to the flow's owner (loop or replay goroutine) like the flow's
// own fields.
type replayState struct {
	o *Options
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

func newReplayState(o *Options) *replayState {
	return &replayState{o: o, replayable: true}
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
	f.c.replaying.Store(false)
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
	if f.c.killReason() != "" || f.eof[0] || rp.fromClient == 0 || (!rp.replayable && f.bytes[1] > 0) {
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
	if f.connecting {
		if flags&nudgeDialTimeout != 0 && f.dialExpired.Load() == f.dialGen {
			f.replayWhy, f.replayCause = whyDialFailed, errConnectTimeout
			l.toReplay(f)
		} else if flags&nudgeMoved != 0 {
			f.replayWhy, f.replayCause = whyMoved, errMoved
			l.toReplay(f)
		}
		return
	}
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
// loop (with the kept bytes pending for the new upstream, if its last one
// had been connected); or ends f when no upstream is left. A first-byte
// deadline moves the connection only to an upstream that is up and
// answers its probes: when there is none, every apiserver is slow, and f
// goes back to wait for the one it has.
func (s *Server) replayFlow(f *flow) {
	why, cause := f.replayWhy, f.replayCause
	f.replayWhy, f.replayCause = whyNone, nil
	o, c, rp := f.o, f.c, f.rp
	u := c.upstream()
	moved, timedOut := why == whyMoved, why == whyTimedOut
	wasConnecting := f.connecting
	f.connecting = false
	var reason string
	if wasConnecting {
		// The connect failed or timed out, or the balancer moved the
		// connection off the upstream before it was connected. u keeps
		// its place until the connection has another (or ends).
		f.closeUpstreamFD()
		if moved {
			reason = "moved off a down upstream"
		} else {
			o.Observer.DialDuration(o.Now().Sub(f.dialStart))
			if c.ctx.Err() == nil && !failure.LocalExhaustion(cause) {
				s.dialFailed(o, u, cause)
			}
			reason = fmt.Sprintf("%s: %v", u.Addr(), cause)
		}
		if c.ctx.Err() != nil || failure.LocalExhaustion(cause) {
			f.err = fmt.Errorf("%w: %s", errNoUpstream, reason)
			f.finish()
			return
		}
	} else {
		reason = firstByteFailure(cause, timedOut, moved, o.FirstByteTimeout)
		if !moved {
			kind := failure.Timeout
			if !timedOut {
				kind = failure.Classify(cause)
			}
			o.Observer.DialFailed(u, kind)
			s.set.Passive(u, reason)
		}
	}
	d, derr := s.dialNext(o, c, f.tried, timedOut)
	if derr != nil && timedOut && c.killReason() == "" {
		rp.patient = true
		o.Logger.Debug("no other upstream is up; waiting for a slow upstream", "upstream", u.Addr())
		f.home.add(f)
		return
	}
	if !wasConnecting {
		f.closeUpstreamFD()
	}
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
	if !wasConnecting {
		if rp != nil {
			o.Observer.Replayed()
			o.Logger.Debug("replaying handshake", "from", u.Addr(), "to", d.u.Addr(), "bytes", len(rp.kept), "reason", reason)
		}
		o.Observer.ConnClosed(u, f.bytes[1], 0)
	}
	u.Release()
	alive := s.assign(c, d.u, d.up)
	ufd := d.fd
	if d.up != nil {
		var err error
		if ufd, err = detach(d.up); err != nil {
			f.err = fmt.Errorf("upstream: %w", err)
			f.finish()
			return
		}
	}
	f.mu.Lock()
	f.fd[1] = ufd
	f.mu.Unlock()
	if d.up != nil {
		f.connectedNow()
	} else {
		f.connectFrom(d.start)
	}
	// The new upstream starts from the kept handshake, and gets the
	// client's FIN again after it.
	f.bytes[1] = 0
	f.eof[1], f.done[1], f.hup[1] = false, false, false
	if rp != nil {
		rp.gen++
		f.pending[1] = append([]byte(nil), rp.kept...)
		f.done[0] = false
	}
	if !alive {
		f.kill()
	}
	f.home.add(f)
}

// closeUpstreamFD closes f's upstream socket (f is out of its loop).
func (f *flow) closeUpstreamFD() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fd[1] >= 0 {
		_ = closeFD(f.fd[1])
		f.fd[1] = -1
	}
}

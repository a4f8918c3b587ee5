package proxy

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/extractedprism/extractedprism/pkg/failure"
	"github.com/extractedprism/extractedprism/pkg/proxy/relay"
)

// moveOn runs in a goroutine of its own while c's flow is out of its loop
// (phase moving; it owns the flow meanwhile): it reports the failure that
// sent the flow out, dials the next upstream and gives the flow back to
// its loop (with the kept handshake to send first, if there is one), or
// ends it when no upstream is left. A first-byte deadline moves the
// connection only to an upstream that is up and answers its probes: when
// there is none, every apiserver is slow, and the flow goes back to wait
// for the one it has.
func (s *Server) moveOn(c *conn, f *relay.Flow) {
	o := c.o
	why, cause := c.why, c.cause
	c.why, c.cause = whyNone, nil
	u := c.upstream()
	moved, timedOut := why == whyMoved, why == whyTimedOut
	wasConnecting := c.fromConnecting
	var reason string
	if wasConnecting {
		// The connect failed or timed out, or the balancer moved the
		// connection off the upstream before it was connected. u keeps
		// its place until the connection has another (or ends).
		f.CloseUpstream()
		if moved {
			reason = "moved off a down upstream"
		} else {
			o.Observer.DialDuration(o.Now().Sub(c.dialStart))
			if c.ctx.Err() == nil && !failure.LocalExhaustion(cause) {
				s.dialFailed(o, u, cause)
			}
			reason = fmt.Sprintf("%s: %v", u.Addr(), cause)
		}
		if c.ctx.Err() != nil || failure.LocalExhaustion(cause) {
			f.End(fmt.Errorf("%w: %s", errNoUpstream, reason))
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
	d, derr := s.dialNext(o, c, c.tried, timedOut)
	if derr != nil && timedOut && c.killReason() == "" {
		c.patient = true
		o.Logger.Debug("no other upstream is up; waiting for a slow upstream", "upstream", u.Addr())
		c.setPhase(phaseWaiting)
		s.giveBack(f)
		return
	}
	if !wasConnecting {
		f.CloseUpstream()
	}
	if derr != nil {
		if c.killReason() == "" {
			o.Observer.NoUpstream()
			s.rlog.Log(context.Background(), slog.LevelWarn, "no-upstream", "client connection closed: no upstream reachable",
				"reason", fmt.Errorf("%s, then: %w", reason, derr))
		}
		f.End(derr)
		return
	}
	if !wasConnecting && c.replay {
		o.Observer.Replayed()
		o.Logger.Debug("replaying handshake", "from", u.Addr(), "to", d.u.Addr(), "bytes", len(c.keep.Kept()), "reason", reason)
	}
	if c.opened {
		c.opened = false
		o.Observer.ConnClosed(u, f.Sent(), 0)
	}
	u.Release()
	alive := s.assign(c, d.u, d.up)
	ufd := d.fd
	if d.up != nil {
		var err error
		if ufd, err = detach(d.up); err != nil {
			_ = d.up.Close()
			f.End(fmt.Errorf("upstream: %w", err))
			return
		}
	}
	// The new upstream starts from the kept handshake, and gets the
	// client's FIN again after it.
	var resend []byte
	if c.replay {
		c.gen++
		resend = append([]byte(nil), c.keep.Kept()...)
	}
	f.ReplaceUpstream(ufd, d.up == nil, resend)
	if d.up != nil {
		c.connectedNow()
		c.armFirstByte()
	} else {
		c.connectFrom(d.start)
	}
	if !alive {
		f.Kill()
	}
	s.giveBack(f)
}

// giveBack returns a detached flow to its loop, or ends it if no loop
// takes it any more.
func (s *Server) giveBack(f *relay.Flow) {
	if r := s.relay.Load(); r == nil || !r.Add(f) {
		f.End(relay.ErrStopped)
	}
}

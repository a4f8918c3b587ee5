package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/extractedprism/extractedprism/pkg/proxy/relay"
)

// conn is its flow's relay.Handler: the relay reports what happened on
// the connection, conn asks policy.go what it means and answers with a
// verdict. These methods run on the flow's owner (see conn.go).

var _ relay.Handler = (*conn)(nil)

// Connected: the connect the loop waited for has finished.
func (c *conn) Connected(_ *relay.Flow, err error) relay.Verdict {
	if reason := c.killReason(); reason != "" {
		return relay.End(errors.New(reason))
	}
	if err != nil {
		c.why, c.cause = whyDialFailed, err
		return relay.Detach
	}
	c.stopDialTimer()
	c.upstream().Opened()
	c.o.Observer.DialDuration(c.o.Now().Sub(c.dialStart))
	c.connectedNow()
	c.armFirstByte() // a kept handshake goes to the new upstream first
	return relay.Continue
}

// ClientBytes: the client sent b while c waits for the first byte.
func (c *conn) ClientBytes(_ *relay.Flow, b []byte) {
	c.keep.Keep(b)
	c.armFirstByte()
}

// FirstByte ends the waiting phase: the kept bytes are dropped and the
// connection is plain forwarding from now on.
func (c *conn) FirstByte(*relay.Flow) { c.answered() }

func (c *conn) answered() {
	c.stopFirstByte()
	c.keep.Drop()
	c.setPhase(phaseRelaying)
}

// UpstreamFailed: the upstream closed or failed before its first byte.
func (c *conn) UpstreamFailed(f *relay.Flow, err error) relay.Verdict {
	d := onUpstreamFailure(c.view(f), err)
	if d.do != stepNext {
		c.answered()
		return relay.Continue
	}
	c.why, c.cause = d.why, d.cause
	return relay.Detach
}

// Woken: requests came (move, deadlines); each counts only if it is for
// what c is doing now.
func (c *conn) Woken(f *relay.Flow) relay.Verdict {
	flags := c.reqs.Swap(0)
	p := c.phaseNow()
	w := wakeView{
		move:        flags&reqMove != 0 && c.moveMeant(),
		dialExpired: flags&reqDial != 0 && p == phaseConnecting && c.dialExpired.Load() == c.dialGen,
		firstByteExpired: flags&reqFirstByte != 0 && p == phaseWaiting && c.fbTimer != nil && !c.patient &&
			c.firstByteExpired.Load() == c.gen,
	}
	d := onWake(p, c.view(f), w)
	switch d.do {
	case stepNext:
		if d.why == whyTimedOut {
			c.fbTimer = nil
		}
		c.why, c.cause = d.why, d.cause
		return relay.Detach
	case stepCloseDown:
		if c.claim(reasonDown) {
			c.o.Observer.ClosedOnDown(1)
		}
		return relay.End(errMoved)
	case stepFail:
		c.fbTimer = nil
		return relay.End(fmt.Errorf("no answer within first_byte_timeout %s", c.o.FirstByteTimeout))
	case stepNone, stepPass:
	}
	return relay.Continue
}

// Detached: the flow left its loop; the mover takes it on.
func (c *conn) Detached(f *relay.Flow) {
	c.stopFirstByte()
	c.stopDialTimer()
	c.fromConnecting = c.phaseNow() == phaseConnecting
	c.setPhase(phaseMoving)
	go c.s.moveOn(c, f)
}

// Ended: the connection is over; its upstream place is released, its
// bytes reported and c untracked. f is nil when c never reached the relay.
func (c *conn) Ended(_ *relay.Flow, sent, received int64, err error) {
	c.stopFirstByte()
	c.stopDialTimer()
	c.setPhase(phaseClosing)
	o := c.o
	u := c.upstream()
	u.Release()
	if c.opened {
		c.opened = false
		o.Observer.ConnClosed(u, sent, received)
	}
	if o.Logger.Enabled(context.Background(), slog.LevelDebug) {
		reason := c.killReason()
		if reason == "" && err != nil {
			reason = err.Error()
		}
		o.Logger.Debug("connection closed", "upstream", u.Addr(),
			"sent", sent, "received", received, "reason", reason, "age", o.Now().Sub(c.start).Round(time.Millisecond))
	}
	c.cancel()
	c.s.untrack(c)
	c.s.wg.Done()
}

// view is what the policy needs to know of c now. Owner only.
func (c *conn) view(f *relay.Flow) waitView {
	return waitView{
		killed:     c.killReason() != "",
		clientEOF:  f.ClientClosed(),
		fromClient: c.keep.FromClient(),
		replayable: c.keep.Replayable(),
	}
}

package proxy

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

// The decisions of a connection's life, as plain functions of what is
// known at the moment (conn.go says who calls them and who carries them
// out). They never touch a socket, a lock or a clock.

// phase is where a connection is in its life; see conn.go.
type phase uint32

const (
	phaseConnecting phase = iota // its upstream is being dialled
	phaseWaiting                 // connected, waiting for the upstream's first byte (replay on)
	phaseRelaying                // plain forwarding
	phaseMoving                  // out of its loop, to the next upstream
	phaseClosing                 // ended
)

func (p phase) String() string {
	switch p {
	case phaseConnecting:
		return "connecting"
	case phaseWaiting:
		return "waiting for the first byte"
	case phaseRelaying:
		return "relaying"
	case phaseMoving:
		return "moving"
	case phaseClosing:
		return "closing"
	}
	return fmt.Sprintf("phase(%d)", uint32(p))
}

// replayWhy says why a connection leaves its loop for the next upstream.
type replayWhy uint8

const (
	whyNone       replayWhy = iota
	whyFailed               // the upstream failed before its first byte
	whyTimedOut             // its first-byte deadline passed
	whyMoved                // close_on_down moves the connection off it
	whyDialFailed           // its connect failed or timed out
)

// step is what to do with a connection.
type step uint8

const (
	stepNone      step = iota // nothing: go on
	stepPass                  // pass the upstream's failure on to the client, as without a balancer
	stepNext                  // leave the loop for the next upstream (replaying the kept handshake)
	stepCloseDown             // close the client: it rides on a down upstream (close_on_down)
	stepFail                  // end the connection: nothing can be replayed
)

// decision is a step and, for stepNext, why.
type decision struct {
	do    step
	why   replayWhy
	cause error
}

// waitView is what the decisions need to know of a connection.
type waitView struct {
	killed     bool // the connection is being closed
	clientEOF  bool // the client has sent its FIN
	fromClient int  // bytes the client has sent
	replayable bool // all of them are kept and are TLS handshake records
}

// wakeView is what a wake-up of the connection's loop brought, each
// request already checked against what it was for (stale ones are false).
type wakeView struct {
	move             bool // close_on_down of the upstream the connection is on
	dialExpired      bool // the deadline of the connect under way passed
	firstByteExpired bool // the armed first-byte deadline of the current upstream passed
}

var (
	errMoved          = errors.New("moved off a down upstream")
	errConnectTimeout = fmt.Errorf("connect: %w", os.ErrDeadlineExceeded)
)

// onUpstreamFailure decides what an upstream's failure before its first
// byte means. It is passed on to the client when the client closed its
// side first (a port check, a client giving up), never sent a byte (the
// upstream timed it out: kube-apiserver's handshake timeout), sent bytes
// that cannot be replayed (whether or not they were written: another
// upstream would get none of them), or the connection is being closed.
// Otherwise the handshake goes to the next upstream.
func onUpstreamFailure(v waitView, err error) decision {
	if v.killed || v.clientEOF || v.fromClient == 0 || !v.replayable {
		return decision{do: stepPass}
	}
	return decision{do: stepNext, why: whyFailed, cause: err}
}

// onWake decides what the requests of a wake-up mean in phase p. A move
// wins over a deadline.
func onWake(p phase, v waitView, w wakeView) decision {
	switch p {
	case phaseConnecting:
		switch {
		case w.dialExpired:
			return decision{do: stepNext, why: whyDialFailed, cause: errConnectTimeout}
		case w.move:
			return decision{do: stepNext, why: whyMoved, cause: errMoved}
		}
	case phaseWaiting:
		switch {
		case w.move && v.fromClient > 0 && !v.replayable:
			return decision{do: stepCloseDown}
		case w.move:
			return decision{do: stepNext, why: whyMoved, cause: errMoved}
		case w.firstByteExpired && (v.clientEOF || !v.replayable):
			return decision{do: stepFail}
		case w.firstByteExpired:
			return decision{do: stepNext, why: whyTimedOut}
		}
	case phaseRelaying:
		if w.move {
			// The upstream answered just before the move: the connection
			// rides on it like those close_on_down closes.
			return decision{do: stepCloseDown}
		}
	case phaseMoving, phaseClosing:
	}
	return decision{}
}

// firstByteFailure describes why a connection left an upstream before its
// first byte, for the passive failure and the logs.
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

// Package relay carries established TCP connections on a few epoll event
// loops (Linux only): descriptors, buffers, half-close. It knows nothing
// of upstreams, health or retries.
//
// A Flow is one connection: the client's socket (side 0) and the
// upstream's (side 1), both non-blocking descriptors the Flow owns. Each
// loop owns an epoll instance (edge-triggered), one read buffer that all
// its flows share, and its flows. A flow costs no goroutine and no buffer
// while idle: bytes are read into the loop's buffer and written straight
// to the other socket. Only when that socket cannot take all of a plain
// read (at most 16 KiB) is the rest copied into a buffer of the flow's
// own, and reading from the source stops until it is flushed; towards a
// side that is behind, the loop peeks instead and takes from the source
// only what was written, so the rest waits in the source's receive queue
// (the kernel's socket buffers then push back on the sender, as with any
// TCP proxy) and a slow reader costs the balancer at most 16 KiB, once.
// The kernel's buffers are bounded too: both sockets refuse writes while
// 128 KiB wait unsent (TCP_NOTSENT_LOWAT), and a source whose destination
// fell behind gets a fixed 256 KiB receive buffer instead of autotuning
// towards tcp_rmem's maximum.
//
// Half-close is forwarded: a read of 0 bytes (FIN) from one side becomes
// shutdown(SHUT_WR) on the other once everything before it was written. A
// flow ends when both directions have ended, or at once on an error on
// either socket; then both descriptors are closed and its Handler hears
// Ended with the byte counts.
//
// What happens on a flow goes up to its Handler (see Handler): its
// upstream's connect finished, the client sent bytes, the upstream sent
// its first byte or failed before it, a Wake arrived. The Handler answers
// with a Verdict: go on, end the flow, or Detach it, which takes the flow
// out of its loop and hands it to the Handler until it gives the flow
// back with Relay.Add (after ReplaceUpstream, for example).
//
// Ownership: while registered, a flow's loop goroutine alone reads and
// writes its sockets and its fields, and calls its Handler; while
// detached, the Handler's goroutine does. Other goroutines touch a flow
// only through Kill, Wake and WithSockets; all hold the flow's lock,
// which is also held while a descriptor is closed or replaced, so nobody
// acts on a descriptor number after it was closed and possibly reused.
package relay

import (
	"errors"
	"fmt"
)

// Handler receives what happens on a flow. Its methods are called by the
// flow's owner (its loop, or with Ended also the goroutine that ends a
// detached flow), never concurrently for one flow; they must not block.
type Handler interface {
	// Connected: the upstream connect the flow was waiting for (see
	// Connecting) has finished; err is nil if it succeeded.
	Connected(f *Flow, err error) Verdict
	// ClientBytes: b was read from the client while the flow watches
	// for the upstream's first byte (see Watch); b is only valid during
	// the call.
	ClientBytes(f *Flow, b []byte)
	// FirstByte: the upstream sent its first byte; the flow stops
	// watching.
	FirstByte(f *Flow)
	// UpstreamFailed: while watching, the upstream closed (io.EOF) or
	// failed (a read or write error). Continue passes the failure on to
	// the client, as without a balancer, and ends the watch; after
	// Detach the flow goes on watching (for its next upstream).
	UpstreamFailed(f *Flow, err error) Verdict
	// Woken: someone called Wake.
	Woken(f *Flow) Verdict
	// Detached: f has left its loop after a Detach verdict and is the
	// Handler's until it gives it back with Relay.Add, or ends it.
	Detached(f *Flow)
	// Ended: the flow has ended and both its sockets are closed; sent
	// counts bytes written to the current upstream, received bytes
	// written to the client, err is what ended it (nil: both directions
	// finished).
	Ended(f *Flow, sent, received int64, err error)
}

// Verdict is a Handler's answer to an event.
type Verdict struct {
	act act
	err error
}

type act uint8

const (
	actContinue act = iota
	actDetach
	actEnd
)

// Continue goes on relaying.
var Continue = Verdict{}

// Detach takes the flow out of its loop and hands it to the Handler.
var Detach = Verdict{act: actDetach}

// End ends the flow at once with err.
func End(err error) Verdict { return Verdict{act: actEnd, err: err} }

// ErrStopped ends the flows of a relay that stops or of a loop that died.
var ErrStopped = errors.New("relay stopped")

// LoopFailure says which loop died, and why.
type LoopFailure struct {
	Index, Of int
	Err       error
}

func (lf *LoopFailure) Error() string {
	return fmt.Sprintf("event loop %d of %d died: %v", lf.Index+1, lf.Of, lf.Err)
}

func (lf *LoopFailure) Unwrap() error { return lf.Err }

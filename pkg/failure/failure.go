// Package failure classifies what an upstream failure looked like from this
// node: refused, no answer in time, not ready, or something else. The
// proxy, the prober, the upstream set, the health policy and the metrics
// share these kinds, so that one failure has one name everywhere.
//
// It also tells this host's own shortages (descriptors, buffers) from an
// upstream's failure: those are never a verdict on an upstream.
package failure

import (
	"context"
	"errors"
	"os"
	"syscall"
)

// Kind is the kind of an upstream failure.
type Kind uint8

const (
	// Other: reset, closed before answering, a TLS or HTTP error.
	Other Kind = iota
	// Refused: the connect was refused; nothing listens on the address
	// (the process is gone, or it closed its listener to shut down).
	Refused
	// Timeout: no answer in time. A hung process, a frozen machine, a
	// lost host, or an overloaded apiserver.
	Timeout
	// Unready: it answered, and said it is not ready.
	Unready
)

// Kinds lists every Kind, in order.
var Kinds = [...]Kind{Other, Refused, Timeout, Unready}

// String returns the kind's name, also the value of metric labels.
func (k Kind) String() string {
	switch k {
	case Refused:
		return "refused"
	case Timeout:
		return "timeout"
	case Unready:
		return "unready"
	}
	return "other"
}

// ErrUnready is wrapped by errors for answers that say "not ready" (a
// health endpoint's non-200 status).
var ErrUnready = errors.New("unhealthy status")

// Classify returns the kind of err. A nil err is Other.
func Classify(err error) Kind {
	var to interface{ Timeout() bool }
	switch {
	case err == nil:
		return Other
	case errors.Is(err, ErrUnready):
		return Unready
	case errors.Is(err, syscall.ECONNREFUSED):
		return Refused
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded),
		errors.Is(err, syscall.ETIMEDOUT), errors.As(err, &to) && to.Timeout():
		return Timeout
	}
	return Other
}

// LocalExhaustion reports errors that are this process's or host's
// shortage (descriptors, buffers, memory), not an upstream's failure.
func LocalExhaustion(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

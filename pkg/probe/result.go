package probe

import (
	"fmt"
	"net/http"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
)

// Readiness is what a round learnt about whether the apiserver says it
// serves.
type Readiness uint8

const (
	// ReadinessUnknown: no explicit answer of the readiness path (TCP mode,
	// a 401/403 to a probe without usable credentials, or no check yet).
	ReadinessUnknown Readiness = iota
	// Ready: the readiness path answered 200.
	Ready
	// Unready: the readiness path answered another status (a 500 while an
	// apiserver starts, shuts down or loses etcd).
	Unready
)

func (r Readiness) String() string {
	switch r {
	case Ready:
		return "ready"
	case Unready:
		return "unready"
	}
	return "unknown"
}

// Evidence says where a round's answer to "is it alive" came from.
type Evidence uint8

const (
	// EvidenceNone: the round proved nothing (it failed).
	EvidenceNone Evidence = iota
	// EvidenceAnswer: an HTTP answer of any status.
	EvidenceAnswer
	// EvidencePing: an HTTP/2 PING acknowledged.
	EvidencePing
	// EvidenceTraffic: data received on the node's proxied connections.
	EvidenceTraffic
	// EvidenceConnect: a TCP connect (TCP mode; the weakest proof).
	EvidenceConnect
	// EvidenceEarlier: no new proof; the last round's stands (a shared
	// verdict applied between rounds).
	EvidenceEarlier
)

func (e Evidence) String() string {
	switch e {
	case EvidenceAnswer:
		return "answer"
	case EvidencePing:
		return "ping"
	case EvidenceTraffic:
		return "traffic"
	case EvidenceConnect:
		return "connect"
	case EvidenceEarlier:
		return "earlier"
	}
	return "none"
}

// Result is the outcome of one probe round of one target. Liveness and
// readiness are two questions: Alive says whether the apiserver's own
// user space answered (any HTTP status proves it), Readiness what its
// readiness path said, if anything.
type Result struct {
	Alive     bool
	Evidence  Evidence
	Readiness Readiness
	// Shared: Readiness came from the cluster's shared verdict, not from
	// a check of this node.
	Shared bool
	// Code is the HTTP status of this round's readiness check (0: none).
	Code int
	// Latency is how long the round's I/O took (0 when it made none).
	Latency time.Duration
	// Err says why the target is not alive, or not ready.
	Err error
	// Note says why readiness is unknown although the target answered
	// ("readiness unknown: 401 Unauthorized"); "" otherwise.
	Note string
}

// OK reports whether the round counts as a success for routing: alive and
// not explicitly unready. A live upstream whose readiness is unknown is
// routed to, as in TCP mode, with liveness still guarding against hangs.
func (r Result) OK() bool { return r.Alive && r.Readiness != Unready }

// readinessOf maps a status of the readiness path to what it says.
func readinessOf(code int) Readiness {
	switch code {
	case http.StatusOK:
		return Ready
	case http.StatusUnauthorized, http.StatusForbidden:
		return ReadinessUnknown
	}
	return Unready
}

// unknownNote is the Note of an answer that says nothing about readiness.
func unknownNote(code int) string {
	return fmt.Sprintf("readiness unknown: %d %s", code, http.StatusText(code))
}

// unreadyErr is the error of an explicit "not ready" answer.
func unreadyErr(path string, code int, shared bool) error {
	if shared {
		return fmt.Errorf("shared readiness verdict: %w %d", failure.ErrUnready, code)
	}
	return fmt.Errorf("probe %s: %w %d", path, failure.ErrUnready, code)
}

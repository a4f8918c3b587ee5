package proxy

import (
	"errors"
	"fmt"
	"io"
	"time"
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
// are dropped. The relay's loops do all of this (replay_linux.go); only
// the dial of the next upstream runs in a goroutine of its own.

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

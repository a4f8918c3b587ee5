package proxy

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
// are dropped. The relay's loops do all of this: package replay keeps the
// bytes, policy.go decides, events.go carries the decisions out; only the
// dial of the next upstream runs in a goroutine of its own (move.go).

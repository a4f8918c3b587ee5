// Package replay keeps a client's bytes until its upstream's first byte,
// while they may be replayed to another upstream: TLS handshake records
// only, up to a bound. It decides nothing about when to replay; the
// proxy does, from what Keeper says.
//
// A TLS client without 0-RTT early data sends no application data before
// the server's first flight, so nothing the client asked for can have
// reached an upstream that failed before answering. Any other record
// type (application data 23, i.e. 0-RTT, or non-TLS bytes) makes the
// connection non-replayable.
package replay

// Keeper holds the client's bytes of one connection. Its zero value keeps
// nothing (limit 0); make one with NewKeeper. It belongs to whoever owns
// the connection at the moment (its event loop, or the goroutine that
// dials the next upstream).
type Keeper struct {
	limit int
	// kept holds the client's bytes while they are replayable.
	kept       []byte
	replayable bool
	fromClient int
}

// NewKeeper returns a Keeper that keeps up to limit bytes.
func NewKeeper(limit int) Keeper { return Keeper{limit: limit, replayable: true} }

// Keep records b, read from the client.
func (k *Keeper) Keep(b []byte) {
	k.fromClient += len(b)
	if k.replayable && len(k.kept)+len(b) <= k.limit {
		k.kept = append(k.kept, b...)
		k.replayable = TLSHandshakeOnly(k.kept)
	} else {
		k.replayable = false
	}
	if !k.replayable {
		k.kept = nil
	}
}

// Kept returns the bytes to send to the next upstream (nil if none or not
// replayable).
func (k *Keeper) Kept() []byte { return k.kept }

// Replayable reports whether everything the client sent is kept.
func (k *Keeper) Replayable() bool { return k.replayable }

// FromClient returns how many bytes the client sent.
func (k *Keeper) FromClient() int { return k.fromClient }

// Drop forgets the kept bytes (the upstream answered).
func (k *Keeper) Drop() { k.kept = nil }

// TLSHandshakeOnly reports whether b is a sequence of TLS records of type
// handshake (22) or change_cipher_spec (20), the last possibly incomplete.
func TLSHandshakeOnly(b []byte) bool {
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

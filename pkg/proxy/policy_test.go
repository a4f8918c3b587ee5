package proxy

import (
	"io"
	"testing"
)

func TestOnUpstreamFailure(t *testing.T) {
	handshake := waitView{fromClient: 300, replayable: true}
	cases := []struct {
		name string
		v    waitView
		want step
	}{
		{"a kept handshake goes to the next upstream", handshake, stepNext},
		{"a silent client gets the close (apiserver handshake timeout)", waitView{replayable: true}, stepPass},
		{"a client that closed its side first gets the close", waitView{fromClient: 300, replayable: true, clientEOF: true}, stepPass},
		{"unreplayable bytes are never sent on as nothing", waitView{fromClient: 25}, stepPass},
		{"a connection being closed is not replayed", waitView{fromClient: 300, replayable: true, killed: true}, stepPass},
	}
	for _, c := range cases {
		d := onUpstreamFailure(c.v, io.EOF)
		if d.do != c.want {
			t.Errorf("%s: step %d, want %d", c.name, d.do, c.want)
		}
		if d.do == stepNext && (d.why != whyFailed || d.cause != io.EOF) {
			t.Errorf("%s: why %d cause %v, want failed, EOF", c.name, d.why, d.cause)
		}
	}
}

func TestOnWake(t *testing.T) {
	handshake := waitView{fromClient: 300, replayable: true}
	plain := waitView{fromClient: 25}
	silent := waitView{replayable: true}
	move := wakeView{move: true}
	expired := wakeView{firstByteExpired: true}
	cases := []struct {
		name string
		p    phase
		v    waitView
		w    wakeView
		want step
		why  replayWhy
	}{
		{"a stale or empty wake does nothing", phaseWaiting, handshake, wakeView{}, stepNone, whyNone},
		{"connect deadline: next upstream", phaseConnecting, silent, wakeView{dialExpired: true}, stepNext, whyDialFailed},
		{"move while connecting: next upstream", phaseConnecting, silent, move, stepNext, whyMoved},
		{"connect deadline wins over a move", phaseConnecting, silent, wakeView{dialExpired: true, move: true}, stepNext, whyDialFailed},
		{"move of a kept handshake: replayed elsewhere", phaseWaiting, handshake, move, stepNext, whyMoved},
		{"move of a silent client: elsewhere", phaseWaiting, silent, move, stepNext, whyMoved},
		{"move of unreplayable bytes: closed as on a down upstream", phaseWaiting, plain, move, stepCloseDown, whyNone},
		{"a move wins over a deadline", phaseWaiting, handshake, wakeView{move: true, firstByteExpired: true}, stepNext, whyMoved},
		{"first-byte deadline of a kept handshake: next upstream", phaseWaiting, handshake, expired, stepNext, whyTimedOut},
		{"first-byte deadline, unreplayable: fails", phaseWaiting, plain, expired, stepFail, whyNone},
		{"first-byte deadline after the client's FIN: fails", phaseWaiting, waitView{fromClient: 300, replayable: true, clientEOF: true}, expired, stepFail, whyNone},
		{"move after the first byte: closed as on a down upstream", phaseRelaying, handshake, move, stepCloseDown, whyNone},
		{"deadlines mean nothing once relaying", phaseRelaying, handshake, expired, stepNone, whyNone},
		{"requests wait while moving", phaseMoving, handshake, move, stepNone, whyNone},
		{"nothing once closing", phaseClosing, handshake, move, stepNone, whyNone},
	}
	for _, c := range cases {
		d := onWake(c.p, c.v, c.w)
		if d.do != c.want || d.why != c.why {
			t.Errorf("%s (%s): step %d why %d, want %d %d", c.name, c.p, d.do, d.why, c.want, c.why)
		}
	}
}

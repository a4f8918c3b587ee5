package proxy

import (
	"runtime"
	"testing"
	"time"
)

// TestHeardWithin: data from the upstream counts as recent traffic for as
// long as it is recent; an established connection on which the upstream
// sent nothing (a stopped apiserver's kernel still accepts) never does.
func TestHeardWithin(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("TCP_INFO is read on Linux only")
	}
	silent := startBackend(t, "tcp", "127.0.0.1:0", echoUntilEOF) // answers nothing until the client is done
	hs := startProxy(t, Options{}, []string{silent.addr()}, silent.addr())
	c := hs.dial(t)
	defer func() { _ = c.Close() }()
	if _, err := c.Write([]byte("hello")); err != nil { // no EOF: the upstream stays silent
		t.Fatal(err)
	}
	us := hs.set.Lookup(silent.addr())
	waitFor(t, "the connection to the silent upstream", 10*time.Second, func() bool { return us.Active() == 1 })
	if hs.srv.HeardWithin(us, time.Hour) {
		t.Error("an upstream that sent nothing counts as heard from")
	}

	talking := startBackend(t, "tcp", "127.0.0.1:0", echo)
	ht := startProxy(t, Options{}, []string{talking.addr()}, talking.addr())
	ut := ht.set.Lookup(talking.addr())
	ht.dialEchoed(t, 1)
	if !ht.srv.HeardWithin(ut, time.Hour) {
		t.Error("an upstream that just answered does not count as heard from")
	}
	waitFor(t, "the answer to age past 50 ms", 10*time.Second, func() bool { return !ht.srv.HeardWithin(ut, 50*time.Millisecond) })
}

package proxy

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/extractedprism/extractedprism/pkg/proxy/relay"
)

// TestBothLegsAreTuned: the client's and the upstream's sockets of a
// proxied connection both carry TCP_NODELAY, keepalive with the configured
// idle time, and TCP_USER_TIMEOUT, with and without replay.
func TestBothLegsAreTuned(t *testing.T) {
	for _, replay := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "replay"}[replay], func(t *testing.T) {
			b := startBackend(t, "tcp", "127.0.0.1:0", echo)
			h := startProxy(t, Options{Replay: replay, KeepAlive: 30 * time.Second, UserTimeout: 7 * time.Second}, []string{b.addr()}, b.addr())
			h.dialEchoed(t, 1)
			h.srv.mu.Lock()
			var f *relay.Flow
			for c := range h.srv.conns {
				c.mu.Lock()
				f = c.flow
				c.mu.Unlock()
			}
			h.srv.mu.Unlock()
			if f == nil {
				t.Fatal("no connection in the relay")
			}
			var fds [2]int
			if !f.WithSockets(func(client, upstream int) bool { fds = [2]int{client, upstream}; return true }) {
				t.Fatal("the connection ended")
			}
			for side, name := range []string{"client", "upstream"} {
				fd := fds[side]
				for _, o := range []struct {
					name       string
					level, opt int
					want       int
				}{
					{"TCP_NODELAY", unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
					{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
					{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 30},
					{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 3},
					{"TCP_USER_TIMEOUT", unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, 7000},
				} {
					got, err := unix.GetsockoptInt(fd, o.level, o.opt)
					if err != nil || got != o.want {
						t.Errorf("%s socket: %s = %d (%v), want %d", name, o.name, got, err, o.want)
					}
				}
			}
		})
	}
}

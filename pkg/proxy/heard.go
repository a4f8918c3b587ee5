package proxy

import (
	"syscall"
	"time"

	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// HeardWithin reports whether any client connection riding on u received
// data from the upstream within d, as the kernel records it. The prober
// asks it to skip due probes of an upstream that real traffic shows alive;
// it reads one socket option per connection and stops at the first recent
// one, without touching the spliced data path.
func (s *Server) HeardWithin(u *upstream.Upstream, d time.Duration) bool {
	for _, c := range s.connsOn(u) {
		c.mu.Lock()
		up := c.up
		c.mu.Unlock()
		sc, ok := up.(syscall.Conn)
		if !ok {
			continue
		}
		rc, err := sc.SyscallConn()
		if err != nil {
			continue
		}
		if receivedWithin(rc, d) {
			return true
		}
	}
	return false
}

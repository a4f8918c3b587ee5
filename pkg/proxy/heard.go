package proxy

import (
	"time"

	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// HeardWithin reports whether any client connection riding on u received
// data from the upstream within d, as the kernel records it. The prober
// asks it to skip due probes of an upstream that real traffic shows alive;
// it reads one socket option per connection and stops at the first recent
// one, without touching the data path.
func (s *Server) HeardWithin(u *upstream.Upstream, d time.Duration) bool {
	for _, c := range s.connsOn(u) {
		if c.heardWithin(d) {
			return true
		}
	}
	return false
}

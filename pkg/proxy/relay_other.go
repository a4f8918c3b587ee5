//go:build !linux

package proxy

import (
	"errors"
	"net/netip"
	"time"

	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// The data path needs epoll (relay_linux.go). Elsewhere the package
// builds, for development, but refuses connections.

var errNoRelay = errors.New("the data path needs Linux (epoll)")

type relay struct{}

func newRelay() (*relay, error) { return nil, errNoRelay }

func (r *relay) add(*flow) {}

func (r *relay) stop() {}

type flow struct {
	s     *Server
	o     *Options
	c     *conn
	tried map[*upstream.Upstream]bool
}

type replayState struct{}

func newReplayState(*Options) *replayState { return nil }

func newFlow(int, dialed, *replayState, func(int64, int64, error)) (*flow, error) {
	return nil, errNoRelay
}

const rawConnectSupported = false

func rawConnect(netip.AddrPort, time.Duration, time.Duration) (int, error) { return -1, errNoRelay }

func (f *flow) connectedNow()         {}
func (f *flow) connectFrom(time.Time) {}
func (f *flow) kill()                 {}
func (f *flow) moveOff()              {}

func (f *flow) heard(time.Duration) bool { return false }

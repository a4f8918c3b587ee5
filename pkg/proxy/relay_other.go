//go:build !linux

package proxy

import (
	"errors"
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

type flow struct{}

type replayState struct{}

func newReplayState(*Server, *Options, *conn, map[*upstream.Upstream]bool) *replayState { return nil }

func newFlow(int, any, *replayState, func(int64, int64, error)) (*flow, error) {
	return nil, errNoRelay
}

func (f *flow) kill() {}

func (f *flow) moveOff() {}

func (f *flow) heard(time.Duration) bool { return false }

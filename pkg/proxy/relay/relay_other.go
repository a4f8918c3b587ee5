//go:build !linux

package relay

import "errors"

// The relay needs epoll. Elsewhere the package builds, for development,
// and New fails.

var errNoEpoll = errors.New("the data path needs Linux (epoll)")

// ErrKilled ends a flow that was killed while its upstream connected.
var ErrKilled = errors.New("killed")

// Config shapes a Relay.
type Config struct {
	Loops int
	Wait  func(loop, epfd int, events []struct{}) (int, error)
}

// Relay is not built here.
type Relay struct{}

// New fails: the data path needs Linux.
func New(Config) (*Relay, error) { return nil, errNoEpoll }

func (r *Relay) Add(*Flow) bool { return false }
func (r *Relay) Err() error     { return nil }
func (r *Relay) Stop()          {}

// Flow is not built here.
type Flow struct{ h Handler }

func NewFlow(_, _ int, h Handler) *Flow                          { return &Flow{h: h} }
func (f *Flow) Connecting()                                      {}
func (f *Flow) Watch()                                           {}
func (f *Flow) Sent() int64                                      { return 0 }
func (f *Flow) ClientClosed() bool                               { return false }
func (f *Flow) ReplaceUpstream(int, bool, []byte)                {}
func (f *Flow) CloseUpstream()                                   {}
func (f *Flow) End(err error)                                    { f.h.Ended(f, 0, 0, err) }
func (f *Flow) Kill()                                            {}
func (f *Flow) Wake()                                            {}
func (f *Flow) WithSockets(func(client, upstream int) bool) bool { return false }

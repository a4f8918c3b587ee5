//go:build !linux

package proxy

import (
	"errors"
	"net"
)

// OtherListener reports false where /proc/net/tcp does not exist: no
// successor is assumed, so a draining process goes on accepting.
func OtherListener(net.Listener) bool { return false }

// ListenerCount cannot count the sockets on a port without /proc/net/tcp.
func ListenerCount(string) (int, error) {
	return 0, errors.New("counting the listeners on a port needs Linux's /proc/net/tcp")
}

package proxy

import (
	"context"
	"fmt"
	"net"
	"syscall"
)

// Listen binds a TCP listener on addr. With reusePort the socket gets
// SO_REUSEPORT, so a second instance (a surged DaemonSet pod, a new
// process during an upgrade) can bind the same address while this one
// drains.
func Listen(ctx context.Context, addr string, reusePort bool) (net.Listener, error) {
	lc := net.ListenConfig{}
	if reusePort {
		lc.Control = func(_, _ string, rc syscall.RawConn) error { return setReusePort(rc) }
	}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	return ln, nil
}

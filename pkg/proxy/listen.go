package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
)

// steeringErr remembers why reuseport steering could not be attached (a
// property of the kernel, the same for every socket).
var steeringErr atomic.Pointer[error]

// Listen binds a TCP listener on addr.
//
// Without reusePort the port is this socket's alone: the kernel refuses
// every other bind of it, whatever the UID.
//
// With reusePort the socket gets SO_REUSEPORT, so a second instance (a
// surged DaemonSet pod, a new process during an upgrade) can bind the same
// address while this one drains. The kernel lets any process of the same
// UID join that way, so the listener announces itself on the listener
// handshake (see group_linux.go), and new connections are steered to the
// newest socket (see preferNewest) only while every socket on the port is
// an extractedprism of ours; the old instance's accept queue is then empty
// when it closes. A Guard keeps that true as sockets come and go.
func Listen(ctx context.Context, addr string, reusePort bool) (net.Listener, error) {
	lc := net.ListenConfig{}
	if reusePort {
		lc.Control = func(_, _ string, rc syscall.RawConn) error { return setReusePort(rc) }
	}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	if !reusePort {
		return ln, nil
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return ln, nil
	}
	rl, err := announce(tl)
	if err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	return rl, nil
}

// HandoverCheck reports whether a second instance binding the same
// address with SO_REUSEPORT can take over without the old one resetting
// the connects queued on its socket when it closes: either the newest
// instance gets every new connection (reuseport BPF steering), or the
// kernel migrates a closing listener's queue (net.ipv4.tcp_migrate_req=1).
// It returns nil when the handover is safe, or an error saying what to do.
func HandoverCheck() error {
	p := steeringErr.Load()
	if p == nil {
		return nil
	}
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	if err == nil && strings.TrimSpace(string(b)) == "1" {
		return nil
	}
	return errors.New("this kernel cannot steer new connections to the newest SO_REUSEPORT listener (" + (*p).Error() +
		") and net.ipv4.tcp_migrate_req is not 1: during a surge handover, connects queued on the old listener " +
		"are reset when it closes; set net.ipv4.tcp_migrate_req=1 on the node")
}

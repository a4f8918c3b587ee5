//go:build !linux

package proxy

import (
	"errors"
	"net"
	"syscall"
	"time"
)

// setUserTimeout is a no-op where TCP_USER_TIMEOUT does not exist.
func setUserTimeout(syscall.RawConn, time.Duration) error { return nil }

// setReusePort is a no-op where SO_REUSEPORT is not supported.
func setReusePort(syscall.RawConn) error { return nil }

// preferNewest is a no-op where reuseport BPF steering does not exist.
func preferNewest(syscall.RawConn) error { return nil }

// receivedWithin reports false where TCP_INFO is not read: every due probe
// runs.
func receivedWithin(syscall.RawConn, time.Duration) bool { return false }

func tuneFD(int, time.Duration, time.Duration) {}

func closeFD(int) error    { return errors.ErrUnsupported }
func shutdownFD(int) error { return errors.ErrUnsupported }

type listenSocket struct{}

func newListenSocket(net.Listener) (*listenSocket, error) { return nil, errors.ErrUnsupported }

func (ls *listenSocket) accept() (int, error) { return -1, errors.ErrUnsupported }

func (ls *listenSocket) close() error { return nil }

//go:build !linux

package proxy

import (
	"errors"
	"net"
	"syscall"
	"time"
)

// The data path needs Linux: its relay needs epoll, and the accept loop a
// listening socket outside Go's poller. Elsewhere the package builds, for
// development, but Serve fails with errNoDataPath: no connection is ever
// accepted.
var errNoDataPath = errors.New("the data path needs Linux (epoll)")

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

func closeFD(int) error       { return errors.ErrUnsupported }
func resetFD(int) error       { return errors.ErrUnsupported }
func detach(any) (int, error) { return -1, errors.ErrUnsupported }
func shutdownFD(int) error    { return errors.ErrUnsupported }

type listenSocket struct{}

func newListenSocket(net.Listener) (*listenSocket, error) { return nil, errNoDataPath }

func (ls *listenSocket) accept() (int, error) { return -1, errors.ErrUnsupported }

func (ls *listenSocket) close() error { return nil }

// receivedOnFD reports false where TCP_INFO is not read.
func receivedOnFD(int, time.Duration) bool { return false }

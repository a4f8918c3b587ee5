//go:build linux

package proxy

import (
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/extractedprism/extractedprism/pkg/proxy/internal/sys"
)

// setUserTimeout sets TCP_USER_TIMEOUT on a raw connection.
func setUserTimeout(rc syscall.RawConn, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	})
	if err != nil {
		return err
	}
	return serr
}

// setReusePort sets SO_REUSEPORT on a raw socket before bind.
func setReusePort(rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	})
	if err != nil {
		return err
	}
	return serr
}

// preferNewest attaches a classic BPF program to the SO_REUSEPORT group of
// rc that hands every new connection to the socket at index 1: the one
// that joined after the current holder. So when a second instance binds
// (a surged pod, a new process during an upgrade), the old instance stops
// receiving connects at once, its accept queue empties, and closing it
// later resets nothing. With a single socket the index is out of range and
// the kernel falls back to its normal choice. The program is the group's,
// whichever socket attaches it, and it would hand a stranger that joined
// the group everything: syncSteering attaches it only while every other
// socket is ours, and detaches it otherwise.
func preferNewest(rc syscall.RawConn) error {
	prog := []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: 1}}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &fprog)
	})
	if err != nil {
		return err
	}
	return serr
}

// receivedWithin reports whether the kernel saw data arrive on rc within d
// (TCP_INFO's last_data_recv). A connection that has received no data at
// all does not count: the kernel completes handshakes for a stopped
// process, so an established connection alone proves nothing.
func receivedWithin(rc syscall.RawConn, d time.Duration) bool {
	var ok bool
	err := rc.Control(func(fd uintptr) {
		ok = receivedOnFD(int(fd), d)
	})
	return err == nil && ok
}

// receivedOnFD is receivedWithin for a bare descriptor.
func receivedOnFD(fd int, d time.Duration) bool {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	return err == nil && info.Bytes_received > 0 && time.Duration(info.Last_data_recv)*time.Millisecond < d
}

// tuneFD sets TCP_NODELAY (the data path forwards what it reads at once,
// as Go does for its own connections), TCP keepalive (idle time ka, a
// third of it between probes, 3 probes) and TCP_USER_TIMEOUT ut on a
// socket; a zero ka or ut leaves that one alone.
func tuneFD(fd int, ka, ut time.Duration) {
	if fd < 0 {
		return
	}
	_ = sys.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if ka > 0 {
		secs := max(1, int(ka/time.Second))
		_ = sys.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
		_ = sys.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, secs)
		_ = sys.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, max(1, secs/3))
		_ = sys.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 3)
	}
	if ut > 0 {
		_ = sys.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(ut.Milliseconds()))
	}
}

func shutdownFD(fd int) error { return sys.Shutdown(fd, unix.SHUT_RDWR) }

func closeFD(fd int) error { return sys.Close(fd) }

// resetFD closes a socket with SO_LINGER 0: the kernel sends a reset
// instead of a FIN and keeps no TIME_WAIT state.
func resetFD(fd int) error {
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	return sys.Close(fd)
}

// detach takes c's socket out of Go's poller (see sys.Detach).
func detach(c any) (int, error) { return sys.Detach(c) }

// listenSocket accepts on a listener's socket through a descriptor of its
// own in Go's poller, so accepted connections come as bare descriptors.
type listenSocket struct {
	file *os.File
	rc   syscall.RawConn
}

func newListenSocket(ln net.Listener) (*listenSocket, error) {
	nfd, err := sys.Dup(ln)
	if err != nil {
		return nil, fmt.Errorf("listener: %w", err)
	}
	file := os.NewFile(uintptr(nfd), "listener") //nolint:gosec // a descriptor just duplicated
	rc, err := file.SyscallConn()
	if err != nil {
		_ = file.Close()
		return nil, fmt.Errorf("listener in Go's poller: %w", err)
	}
	return &listenSocket{file: file, rc: rc}, nil
}

// accept returns the next connection's descriptor (non-blocking,
// close-on-exec), waiting in Go's poller. It fails with os.ErrClosed once
// close was called, and with the system's error otherwise (EMFILE, ...).
func (ls *listenSocket) accept() (int, error) {
	fd := -1
	var aerr error
	err := ls.rc.Read(func(lfd uintptr) bool {
		for {
			r, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, lfd, 0, 0, uintptr(unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC), 0, 0)
			switch e { //nolint:exhaustive // the rest are failures
			case 0:
				fd = int(r) //nolint:gosec // a descriptor
				return true
			case unix.EINTR, unix.ECONNABORTED:
				continue // as Go's own accept does
			case unix.EAGAIN:
				return false
			default:
				aerr = os.NewSyscallError("accept4", e)
				return true
			}
		}
	})
	if err != nil {
		return -1, err
	}
	return fd, aerr
}

func (ls *listenSocket) close() error { return ls.file.Close() }

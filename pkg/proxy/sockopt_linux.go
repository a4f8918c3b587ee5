//go:build linux

package proxy

import (
	"syscall"
	"time"

	"golang.org/x/sys/unix"
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
// the kernel falls back to its normal choice.
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

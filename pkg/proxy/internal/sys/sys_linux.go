//go:build linux

package sys

import (
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Read, Peek, Discard, Write, EpollWait (with a zero timeout), EpollCtl,
// Shutdown, SetsockoptInt, Close and ConnectResult are made without the runtime's
// system call bookkeeping: on non-blocking sockets without SO_LINGER none
// of them ever blocks. Besides saving that bookkeeping, this keeps the
// runtime's monitor thread asleep: every system call made the usual way
// after the process was idle wakes it into polling at its shortest
// period, which under request-response traffic, idle between requests,
// costs more than the requests.

// EpollWait is epoll_pwait with a zero timeout.
func EpollWait(epfd int, events []unix.EpollEvent) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(unsafe.SliceData(events))), uintptr(len(events)), 0, 0, 0) //nolint:gosec // epfd is a descriptor
	if e != 0 {
		return 0, e
	}
	return int(r), nil //nolint:gosec // at most len(events)
}

// Read is read(2).
func Read(fd int, b []byte) (int, error) {
	r, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b))) //nolint:gosec // fd is a descriptor
	if e != 0 {
		return 0, e
	}
	return int(r), nil //nolint:gosec // at most len(b)
}

// Peek is recv(2) with MSG_PEEK: it copies the bytes the socket holds
// into b and leaves them there, to be taken with Discard once they have
// gone on.
func Peek(fd int, b []byte) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)), unix.MSG_PEEK, 0, 0) //nolint:gosec // fd is a descriptor
	if e != 0 {
		return 0, e
	}
	return int(r), nil //nolint:gosec // at most len(b)
}

// Discard takes len(b) bytes out of a socket's receive queue: a TCP
// socket drops them without copying (recv(2) with MSG_TRUNC, see tcp(7));
// other sockets (a Unix socket pair) copy them into b. len(b) must not
// exceed what a Peek just returned.
func Discard(fd int, b []byte) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)), unix.MSG_TRUNC, 0, 0) //nolint:gosec // fd is a descriptor
	if e != 0 {
		return 0, e
	}
	return int(r), nil //nolint:gosec // at most len(b)
}

// Write is write(2).
func Write(fd int, b []byte) (int, error) {
	r, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b))) //nolint:gosec // fd is a descriptor
	if e != 0 {
		return 0, e
	}
	return int(r), nil //nolint:gosec // at most len(b)
}

// EpollCtl is epoll_ctl(2).
func EpollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0) //nolint:gosec // descriptors
	if e != 0 {
		return e
	}
	return nil
}

// Shutdown is shutdown(2).
func Shutdown(fd, how int) error {
	_, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), uintptr(how), 0) //nolint:gosec // a descriptor
	if e != 0 {
		return e
	}
	return nil
}

// SetsockoptInt sets an int socket option.
func SetsockoptInt(fd, level, opt, value int) error {
	v := int32(value)                                                                                                              //nolint:gosec // socket option values are small
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0) //nolint:gosec // a descriptor
	if e != 0 {
		return e
	}
	return nil
}

// Close is close(2).
func Close(fd int) error {
	_, _, e := unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0) //nolint:gosec // a descriptor
	if e != 0 {
		return e
	}
	return nil
}

// ConnectResult returns the outcome of fd's non-blocking connect once it
// is writable (SO_ERROR): nil when connected.
func ConnectResult(fd int) error {
	var v int32
	l := uint32(4)
	_, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_ERROR, //nolint:gosec // a descriptor
		uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return e
	}
	if v != 0 {
		return unix.Errno(v) //nolint:gosec // an errno
	}
	return nil
}

// Detach duplicates c's socket descriptor and closes c, so that the socket
// lives on in the returned descriptor only, outside Go's poller. On error
// c is left open.
func Detach(c any) (int, error) {
	nfd, err := Dup(c)
	if err != nil {
		return -1, err
	}
	if cl, ok := c.(interface{ Close() error }); ok {
		_ = cl.Close()
	}
	return nfd, nil
}

// Dup returns a close-on-exec duplicate of c's socket descriptor.
func Dup(c any) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, fmt.Errorf("%T has no socket descriptor", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("raw socket: %w", err)
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, fmt.Errorf("raw socket: %w", err)
	}
	if derr != nil {
		return -1, fmt.Errorf("duplicate descriptor: %w", derr)
	}
	return nfd, nil
}

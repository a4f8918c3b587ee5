//go:build linux

package proxy

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Connecting from the event loop.
//
// With the default dialer and an upstream given as an IP address, the
// upstream socket is created and its connect started without blocking
// (rawConnect), and the flow waits for the connect in its loop: writable
// means done, and SO_ERROR says how it went. A failed or timed-out connect
// sends the flow to the same goroutine as a replay, which reports the
// failure and starts the next connect. The other cases (a host name, a
// Dial given in Options) dial in a goroutine with Go's dialer.

// rawConnect creates a non-blocking socket tuned by tuneFD (TCP_NODELAY,
// keepalive ka, TCP_USER_TIMEOUT ut), and starts connecting it to ap. It returns the
// descriptor (the connect may still be in progress) or the error of the
// socket or the connect.
func rawConnect(ap netip.AddrPort, ka, ut time.Duration) (int, error) {
	family := unix.AF_INET
	if ap.Addr().Is6() && !ap.Addr().Is4In6() {
		family = unix.AF_INET6
	}
	r, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), uintptr(unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC), 0)
	if e != 0 {
		return -1, e
	}
	fd := int(r) //nolint:gosec // a descriptor
	tuneFD(fd, ka, ut)
	var err error
	if family == unix.AF_INET {
		sa := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: ap.Addr().Unmap().As4()}
		putPort(&sa.Port, ap.Port())
		err = rawConnectSockaddr(fd, unsafe.Pointer(&sa), unix.SizeofSockaddrInet4)
	} else {
		sa := unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: ap.Addr().As16()}
		putPort(&sa.Port, ap.Port())
		if z := ap.Addr().Zone(); z != "" {
			if ifi, ierr := netInterfaceIndex(z); ierr == nil {
				sa.Scope_id = ifi
			}
		}
		err = rawConnectSockaddr(fd, unsafe.Pointer(&sa), unix.SizeofSockaddrInet6)
	}
	if err != nil {
		_ = closeFD(fd)
		return -1, err
	}
	return fd, nil
}

func rawConnectSockaddr(fd int, sa unsafe.Pointer, n uintptr) error {
	_, _, e := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(sa), n) //nolint:gosec // a descriptor
	if e == 0 || e == unix.EINPROGRESS {
		return nil
	}
	return e
}

// putPort stores port in network byte order.
func putPort(dst *uint16, port uint16) {
	b := (*[2]byte)(unsafe.Pointer(dst))
	b[0], b[1] = byte(port>>8), byte(port)
}

// connectResult returns the outcome of fd's connect once it is writable
// (SO_ERROR): nil when connected.
func connectResult(fd int) error {
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

// rawConnectSupported: dialNext may start connects without blocking.
const rawConnectSupported = true

var errConnectTimeout = fmt.Errorf("connect: %w", os.ErrDeadlineExceeded)

// connectFrom marks f's upstream socket as connecting since start and
// arms its connect deadline.
func (f *flow) connectFrom(start time.Time) {
	f.connecting = true
	f.dialStart = start
	f.dialGen++
	gen := f.dialGen
	f.dialTimer = time.AfterFunc(f.o.DialTimeout, func() {
		f.dialExpired.Store(gen)
		f.nudge(nudgeDialTimeout)
	})
}

func (f *flow) stopDialTimer() {
	if f.dialTimer != nil {
		f.dialTimer.Stop()
		f.dialTimer = nil
	}
}

// connectedNow records that f's upstream socket is connected.
func (f *flow) connectedNow() {
	if len(f.tried) > 1 && !f.failedOver {
		f.failedOver = true
		f.o.Observer.Failover() // once per connection, however many tries
	}
	f.o.Observer.ConnOpened(f.c.upstream())
}

// connectDone checks a connecting flow whose upstream socket had an
// event: it reports true once connected; on a failed connect it sends f
// to the next upstream (see replayFlow), and if f was closed meanwhile it
// ends it.
func (l *loop) connectDone(f *flow) bool {
	if reason := f.c.killReason(); reason != "" {
		f.err = errors.New(reason)
		l.end(f)
		return false
	}
	if !f.writable[1] && !f.hup[1] {
		return false // still connecting
	}
	if err := connectResult(f.fd[1]); err != nil {
		f.replayWhy, f.replayCause = whyDialFailed, err
		l.toReplay(f)
		return false
	}
	f.connecting = false
	f.stopDialTimer()
	f.c.upstream().Opened()
	f.o.Observer.DialDuration(f.o.Now().Sub(f.dialStart))
	f.connectedNow()
	return true
}

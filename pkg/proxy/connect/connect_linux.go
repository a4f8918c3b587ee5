//go:build linux

package connect

import (
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/extractedprism/extractedprism/pkg/proxy/internal/sys"
)

// Supported reports whether Start can be used here.
const Supported = true

// Start creates a non-blocking, close-on-exec socket, lets tune set its
// options, and starts connecting it to ap. It returns the descriptor (the
// connect may still be in progress: the socket becomes writable when it
// is done, and relay reads its outcome) or the error of the socket or the
// connect.
func Start(ap netip.AddrPort, tune func(fd int)) (int, error) {
	family := unix.AF_INET
	if ap.Addr().Is6() && !ap.Addr().Is4In6() {
		family = unix.AF_INET6
	}
	r, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), uintptr(unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC), 0)
	if e != 0 {
		return -1, e
	}
	fd := int(r) //nolint:gosec // a descriptor
	if tune != nil {
		tune(fd)
	}
	var err error
	if family == unix.AF_INET {
		sa := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: ap.Addr().Unmap().As4()}
		putPort(&sa.Port, ap.Port())
		err = connectSockaddr(fd, unsafe.Pointer(&sa), unix.SizeofSockaddrInet4)
	} else {
		sa := unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: ap.Addr().As16()}
		putPort(&sa.Port, ap.Port())
		if z := ap.Addr().Zone(); z != "" {
			if ifi, ierr := interfaceIndex(z); ierr == nil {
				sa.Scope_id = ifi
			}
		}
		err = connectSockaddr(fd, unsafe.Pointer(&sa), unix.SizeofSockaddrInet6)
	}
	if err != nil {
		_ = sys.Close(fd)
		return -1, err
	}
	return fd, nil
}

func connectSockaddr(fd int, sa unsafe.Pointer, n uintptr) error {
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

// interfaceIndex resolves an IPv6 zone (interface name).
func interfaceIndex(zone string) (uint32, error) {
	ifi, err := net.InterfaceByName(zone)
	if err != nil {
		return 0, fmt.Errorf("zone %q: %w", zone, err)
	}
	return uint32(ifi.Index), nil //nolint:gosec // interface indexes are small
}

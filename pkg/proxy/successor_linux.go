package proxy

import (
	"bufio"
	"encoding/hex"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// OtherListener reports whether a listening TCP socket other than ln
// serves ln's address (same port; same address, or either side a wildcard)
// in this network namespace: a successor that bound the port with
// SO_REUSEPORT and takes new connects from the kernel. It reads
// /proc/net/tcp and /proc/net/tcp6; on any error it reports false (no
// successor assumed, so the draining process goes on accepting).
func OtherListener(ln net.Listener) bool {
	addr, ok := ln.Addr().(*net.TCPAddr)
	if !ok {
		return false
	}
	own := socketInode(ln)
	if own == 0 {
		return false
	}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		if otherListenerIn(f, addr, own) {
			return true
		}
	}
	return false
}

// socketInode returns the inode of ln's socket, 0 if unknown.
func socketInode(ln net.Listener) uint64 {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return 0
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0
	}
	var ino uint64
	_ = rc.Control(func(fd uintptr) {
		var st syscall.Stat_t
		if syscall.Fstat(int(fd), &st) == nil {
			ino = st.Ino
		}
	})
	return ino
}

// tcpListen is the state column of a listening socket in /proc/net/tcp.
const tcpListen = "0A"

func otherListenerIn(path string, addr *net.TCPAddr, own uint64) bool {
	f, err := os.Open(path) //nolint:gosec // a fixed /proc path
	if err != nil {
		return false
	}
	defer func() { _ = f.Close() }()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 10 || fs[3] != tcpListen {
			continue
		}
		ino, err := strconv.ParseUint(fs[9], 10, 64)
		if err != nil || ino == own || ino == 0 {
			continue
		}
		ip, port, ok := parseProcAddr(fs[1])
		if !ok || port != addr.Port {
			continue
		}
		if ip.Equal(addr.IP) || ip.IsUnspecified() || addr.IP.IsUnspecified() {
			return true
		}
	}
	return false
}

// parseProcAddr parses "0100007F:1D15" (IPv4) or the 32-digit IPv6 form of
// /proc/net/tcp*: the address is printed as 32-bit words in host order,
// little endian on every architecture the project ships (amd64, arm64).
func parseProcAddr(s string) (net.IP, int, bool) {
	h, p, ok := strings.Cut(s, ":")
	if !ok {
		return nil, 0, false
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return nil, 0, false
	}
	b, err := hex.DecodeString(h)
	if err != nil || (len(b) != 4 && len(b) != 16) {
		return nil, 0, false
	}
	for i := 0; i < len(b); i += 4 {
		b[i], b[i+1], b[i+2], b[i+3] = b[i+3], b[i+2], b[i+1], b[i]
	}
	return net.IP(b), int(port), true
}

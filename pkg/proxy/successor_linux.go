package proxy

import (
	"encoding/hex"
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"
)

// OtherListener reports whether a listening TCP socket other than ln
// serves ln's address (same port; same address, or either side a wildcard)
// in this network namespace and is an extractedprism of ours (same UID,
// answers the listener handshake): a successor that bound the port with
// SO_REUSEPORT and takes new connects from the kernel. A stranger on the
// port is no successor: the draining process goes on accepting rather
// than leave the port to it. It reads /proc/net/tcp and /proc/net/tcp6;
// on any error it reports false (no successor assumed).
func OtherListener(ln net.Listener) bool {
	addr, ok := ln.Addr().(*net.TCPAddr)
	if !ok {
		return false
	}
	own := socketInode(ln)
	if own == 0 {
		return false
	}
	others, err := listenersOn(addr, own)
	if err != nil {
		return false
	}
	for _, m := range others {
		if m.ours() {
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

// ListenerCount returns how many listening TCP sockets serve addr
// (host:port; same port and same address, or either side a wildcard) in
// this network namespace, whoever holds them: two while a successor and
// its predecessor share the port. It reads /proc/net/tcp and /proc/net/tcp6.
func ListenerCount(addr string) (int, error) {
	ta, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		return 0, fmt.Errorf("listener address %q: %w", addr, err)
	}
	ms, err := listenersOn(ta, 0)
	if err != nil {
		return 0, err
	}
	return len(ms), nil
}

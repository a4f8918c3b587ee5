//go:build linux

package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A listening socket opened with SO_REUSEPORT shares its port with every
// socket of the same UID that binds it the same way: the kernel spreads
// new connections over all of them. The kernel's only check is the UID,
// so a balancer that uses reuse-port checks every other socket on its
// port itself before it steers connections to one or hands the port over
// to it (see Guard):
//
//   - its owner UID (from /proc/net/tcp and /proc/net/tcp6) must be ours;
//   - the process holding it must answer the listener handshake: every
//     socket that Listen opens with reuse-port is announced on the
//     abstract unix socket named by handshakeName(inode), in the network
//     namespace both share, and answers a peer of its own UID with
//     handshakeGreeting and the inode. A socket whose holder does not
//     answer is a stranger.
//
// The handshake tells apart another extractedprism from any other program
// that happens to or means to listen there. It cannot tell apart a program
// written to imitate it: a process of the same UID can do whatever this
// one can, so the UID is the boundary, and the shipping forms run under a
// UID of their own with reuse-port off unless a surge handover needs it.

// handshakeGreeting starts the answer of the listener handshake.
const handshakeGreeting = "extractedprism listener "

// handshakeTimeout bounds one handshake, so a process that accepts and
// never answers costs a check no more than this.
const handshakeTimeout = 500 * time.Millisecond

// handshakeName is the abstract unix socket address where the holder of
// the listening socket with inode ino answers the handshake.
func handshakeName(ino uint64) string {
	return "@extractedprism/listener/" + strconv.FormatUint(ino, 10)
}

// member is another listening socket on the port of one of our listeners.
type member struct {
	inode uint64
	uid   uint32
	addr  string
}

// listenersOn returns the listening sockets other than the one with inode
// own that serve addr (same port; same address, or either side a
// wildcard) in this network namespace, from /proc/net/tcp and
// /proc/net/tcp6.
func listenersOn(addr *net.TCPAddr, own uint64) ([]member, error) {
	var out []member
	var errs []error
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		ms, err := listenersIn(f, addr, own)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, ms...)
	}
	if len(errs) == 2 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

func listenersIn(path string, addr *net.TCPAddr, own uint64) ([]member, error) {
	f, err := os.Open(path) //nolint:gosec // a fixed /proc path
	if err != nil {
		return nil, fmt.Errorf("list listening sockets: %w", err)
	}
	defer func() { _ = f.Close() }()
	var out []member
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 10 {
			continue
		}
		if fs[3] != tcpListen {
			// The kernel lists listening sockets first: the rest
			// (established and others) need not be read, or even
			// generated.
			break
		}
		ino, err := strconv.ParseUint(fs[9], 10, 64)
		if err != nil || ino == own || ino == 0 {
			continue
		}
		ip, port, ok := parseProcAddr(fs[1])
		if !ok || port != addr.Port {
			continue
		}
		if !ip.Equal(addr.IP) && !ip.IsUnspecified() && !addr.IP.IsUnspecified() {
			continue
		}
		uid, err := strconv.ParseUint(fs[7], 10, 32)
		if err != nil {
			continue
		}
		out = append(out, member{inode: ino, uid: uint32(uid), addr: net.JoinHostPort(ip.String(), strconv.Itoa(port))})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return out, nil
}

// ours reports whether m is a listening socket of an extractedprism of our
// UID: its owner is our UID and its holder answers the handshake.
func (m member) ours() bool {
	if m.uid != uint32(os.Geteuid()) { //nolint:gosec // UIDs are 32-bit
		return false
	}
	c, err := net.DialTimeout("unix", handshakeName(m.inode), handshakeTimeout)
	if err != nil {
		return false
	}
	defer func() { _ = c.Close() }()
	if uid, ok := peerUID(c); !ok || uid != uint32(os.Geteuid()) { //nolint:gosec // UIDs are 32-bit
		return false
	}
	_ = c.SetReadDeadline(time.Now().Add(handshakeTimeout))
	line, err := bufio.NewReaderSize(c, 64).ReadString('\n')
	return err == nil && line == handshakeGreeting+strconv.FormatUint(m.inode, 10)+"\n"
}

// peerUID returns the UID of the process at the other end of a unix
// socket connection.
func peerUID(c net.Conn) (uint32, bool) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return 0, false
	}
	return cred.Uid, true
}

// responder answers the listener handshake for one listening socket.
type responder struct {
	ln   *net.UnixListener
	once sync.Once
	done chan struct{}
}

// startResponder announces the listening socket with inode ino.
func startResponder(ino uint64) (*responder, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: handshakeName(ino), Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listener handshake socket: %w", err)
	}
	r := &responder{ln: ln, done: make(chan struct{})}
	go r.serve(handshakeGreeting + strconv.FormatUint(ino, 10) + "\n")
	return r, nil
}

// serve answers peers of our UID, one at a time, each within
// handshakeTimeout; others get nothing.
func (r *responder) serve(greeting string) {
	defer close(r.done)
	for {
		c, err := r.ln.AcceptUnix()
		if err != nil {
			return
		}
		if uid, ok := peerUID(c); ok && uid == uint32(os.Geteuid()) { //nolint:gosec // UIDs are 32-bit
			_ = c.SetWriteDeadline(time.Now().Add(handshakeTimeout))
			_, _ = c.Write([]byte(greeting))
		}
		_ = c.Close()
	}
}

// close stops answering and waits for the responder's goroutine.
func (r *responder) close() {
	r.once.Do(func() { _ = r.ln.Close() })
	<-r.done
}

// reuseListener is a listener opened with SO_REUSEPORT by Listen: it
// answers the listener handshake while it is open.
type reuseListener struct {
	*net.TCPListener
	inode uint64
	resp  *responder
}

// Close closes the listening socket, then its handshake socket.
func (l *reuseListener) Close() error {
	err := l.TCPListener.Close()
	l.resp.close()
	return err
}

// newReuseListener announces ln on its handshake socket.
func newReuseListener(ln *net.TCPListener) (*reuseListener, error) {
	ino := socketInode(ln)
	if ino == 0 {
		return nil, errors.New("listening socket has no inode")
	}
	r, err := startResponder(ino)
	if err != nil {
		return nil, err
	}
	return &reuseListener{TCPListener: ln, inode: ino, resp: r}, nil
}

// syncSteering looks at the other sockets on l's port and sets the
// group's steering: new connections go to the newest socket only when
// every other socket is one of ours (a successor or a predecessor);
// alone, or with a stranger among them, no steering is attached (the
// kernel spreads by hash), so steering never hands a stranger every new
// connection. It returns the strangers.
func (l *reuseListener) syncSteering() ([]member, error) {
	addr, ok := l.Addr().(*net.TCPAddr)
	if !ok {
		return nil, errors.New("not a TCP listener")
	}
	others, err := listenersOn(addr, l.inode)
	if err != nil {
		return nil, err
	}
	var strangers []member
	for _, m := range others {
		if !m.ours() {
			strangers = append(strangers, m)
		}
	}
	rc, err := l.SyscallConn()
	if err != nil {
		return strangers, fmt.Errorf("raw listener: %w", err)
	}
	if len(others) > 0 && len(strangers) == 0 {
		if err := preferNewest(rc); err != nil {
			steeringErr.Store(&err)
		}
		return nil, nil
	}
	return strangers, detachSteering(rc)
}

// probeSteering records whether this kernel accepts reuseport BPF
// steering (see HandoverCheck) without leaving it attached.
func (l *reuseListener) probeSteering() {
	rc, err := l.SyscallConn()
	if err != nil {
		return
	}
	if err := preferNewest(rc); err != nil {
		steeringErr.Store(&err)
		return
	}
	_ = detachSteering(rc)
}

// detachSteering removes the BPF program of rc's SO_REUSEPORT group, if
// one is attached.
func detachSteering(rc syscall.RawConn) error {
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DETACH_REUSEPORT_BPF, 0)
	}); err != nil {
		return err
	}
	// ENOENT: nothing attached; EOPNOTSUPP, ENOPROTOOPT: a kernel without
	// reuseport BPF, where nothing can be.
	if serr != nil && !errors.Is(serr, unix.ENOENT) && !errors.Is(serr, unix.EOPNOTSUPP) && !errors.Is(serr, unix.ENOPROTOOPT) {
		return fmt.Errorf("detach reuseport steering: %w", serr)
	}
	return nil
}

// holderOf finds a process of this PID namespace that holds the socket
// with inode ino, for the report of a stranger: its PID and executable
// ("" when it cannot be read), or PID 0 when no visible process holds it
// (another container's processes are not visible from this one).
func holderOf(ino uint64) (int, string) {
	want := "socket:[" + strconv.FormatUint(ino, 10) + "]"
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return 0, ""
	}
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		dir := filepath.Join("/proc", p.Name(), "fd")
		fds, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if l, err := os.Readlink(filepath.Join(dir, fd.Name())); err == nil && l == want {
				exe, _ := os.Readlink(filepath.Join("/proc", p.Name(), "exe"))
				return pid, exe
			}
		}
	}
	return 0, ""
}

// checkGroup checks the group of a listener that Listen opened with
// reuse-port and sets its steering; guarded is false for any other
// listener.
func checkGroup(ln net.Listener) (strangers []member, guarded bool, err error) {
	rl, ok := ln.(*reuseListener)
	if !ok {
		return nil, false, nil
	}
	s, err := rl.syncSteering()
	return s, true, err
}

// announce makes ln a listener that answers the handshake, and sets its
// group's steering for the sockets already on the port. When the port's
// sockets cannot be listed, no steering is attached (the Guard reports
// why).
func announce(ln *net.TCPListener) (net.Listener, error) {
	rl, err := newReuseListener(ln)
	if err != nil {
		return nil, err
	}
	addr, _ := ln.Addr().(*net.TCPAddr)
	others, err := listenersOn(addr, rl.inode)
	switch {
	case err != nil:
	case len(others) == 0:
		rl.probeSteering()
	default:
		_, _ = rl.syncSteering()
	}
	return rl, nil
}

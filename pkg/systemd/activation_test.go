package systemd

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// childModeEnv makes the test binary act as a socket-activated child (see
// runChild) instead of running tests.
const childModeEnv = "EXTRACTEDPRISM_SYSTEMD_TEST_CHILD"

// runChild is the child process side of the activation tests. It reports what
// ActivatedListeners returned on stdout, one "key=value" per line, then in
// "serve" mode accepts one connection on the first listener and writes its pid.
func runChild(mode string) int {
	listeners, err := ActivatedListeners()
	fmt.Printf("err=%v\n", err)
	fmt.Printf("count=%d\n", len(listeners))
	for _, l := range listeners {
		fmt.Printf("addr=%s\n", l.Addr())
	}
	for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		v, ok := os.LookupEnv(k)
		fmt.Printf("env %s=%v:%s\n", k, ok, v)
	}
	fmt.Println("end")
	if mode == "serve" && len(listeners) > 0 {
		c, err := listeners[0].Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		_, _ = fmt.Fprintf(c, "served by %d\n", os.Getpid())
		_ = c.Close()
	}
	for _, l := range listeners {
		_ = l.Close()
	}
	return 0
}

// childReport is what runChild printed before "end".
type childReport struct {
	err   string
	count int
	addrs []string
	env   []string
}

// startChild runs the test binary as a child with extra as fds 3, 4, ... and
// LISTEN_FDS set, through /bin/sh so that LISTEN_PID is the child's own pid
// (exec keeps it), the way systemd sets it between fork and exec.
func startChild(t *testing.T, mode, listenPID string, extra ...*os.File) (*exec.Cmd, *bufio.Reader, childReport) {
	t.Helper()
	script := `export LISTEN_PID=$$; exec "$0"`
	if listenPID != "" {
		script = `export LISTEN_PID=` + listenPID + `; exec "$0"`
	}
	cmd := exec.Command("/bin/sh", "-c", script, os.Args[0])
	cmd.Env = append(os.Environ(),
		childModeEnv+"="+mode,
		"LISTEN_FDS="+strconv.Itoa(len(extra)),
		"LISTEN_FDNAMES=extractedprism",
	)
	cmd.ExtraFiles = extra
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	r := bufio.NewReader(out)
	var rep childReport
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("child output ended before its report: %v", err)
		}
		line = strings.TrimSuffix(line, "\n")
		switch k, v, _ := strings.Cut(line, "="); k {
		case "end":
			return cmd, r, rep
		case "err":
			rep.err = v
		case "count":
			rep.count, _ = strconv.Atoi(v)
		case "addr":
			rep.addrs = append(rep.addrs, v)
		default:
			rep.env = append(rep.env, line)
		}
	}
}

func tcpListenerFile(t *testing.T) (string, *os.File) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	// f is a dup: the socket stays open through f alone.
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return addr, f
}

func TestActivatedListenersServeInheritedSocket(t *testing.T) {
	addr, f := tcpListenerFile(t)
	cmd, out, rep := startChild(t, "serve", "", f)
	// Only the child holds the socket now.
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if rep.err != "<nil>" || rep.count != 1 || len(rep.addrs) != 1 || rep.addrs[0] != addr {
		t.Fatalf("child got err=%s, %d listeners %v; want 1 listener on %s", rep.err, rep.count, rep.addrs, addr)
	}
	for _, e := range rep.env {
		if !strings.HasSuffix(e, "=false:") {
			t.Errorf("child still has %s after ActivatedListeners, want it unset", e)
		}
	}

	c, err := net.DialTimeout("tcp", addr, 30*time.Second)
	if err != nil {
		t.Fatalf("dial the inherited socket %s: %v", addr, err)
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("served by %d\n", cmd.Process.Pid); string(got) != want {
		t.Errorf("connection to %s answered %q, want %q", addr, got, want)
	}
	_, _ = io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil {
		t.Errorf("child: %v", err)
	}
}

func TestActivatedListenersOtherPID(t *testing.T) {
	_, f := tcpListenerFile(t)
	// LISTEN_PID of another process: the descriptors are not meant for us.
	_, _, rep := startChild(t, "report", "1", f)
	if rep.err != "<nil>" || rep.count != 0 {
		t.Fatalf("child with LISTEN_PID=1 got err=%s, %d listeners; want none", rep.err, rep.count)
	}
	for _, e := range rep.env {
		if !strings.HasSuffix(e, "=false:") {
			t.Errorf("child still has %s, want it unset", e)
		}
	}
}

func TestActivatedListenersNone(t *testing.T) {
	t.Setenv("LISTEN_PID", "")
	t.Setenv("LISTEN_FDS", "")
	ls, err := ActivatedListeners()
	if err != nil || ls != nil {
		t.Fatalf("ActivatedListeners without LISTEN_FDS = %v, %v; want nil, nil", ls, err)
	}
}

func TestActivatedListenersRejectsDatagramSocket(t *testing.T) {
	addr, tcp := tcpListenerFile(t)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	udp, err := pc.(*net.UDPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	_ = pc.Close()
	defer func() { _ = udp.Close() }()
	_, _, rep := startChild(t, "report", "", tcp, udp)
	if rep.count != 0 || !strings.Contains(rep.err, "activated fd 4") || !strings.Contains(rep.err, "not a stream listener") {
		t.Fatalf("child passed a TCP listener (%s) and a UDP socket got err=%q, %d listeners; want an error naming fd 4 and no listeners",
			addr, rep.err, rep.count)
	}
}

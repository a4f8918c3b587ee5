package daemon

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/extractedprism/extractedprism/pkg/config"
	"github.com/extractedprism/extractedprism/pkg/proxy"
)

// strangerEnv, set in the environment of a re-executed test binary, makes
// it a stranger: it binds the comma-separated addresses it names with
// SO_REUSEPORT, says "bound ADDR" or "refused ADDR ERROR" for each, then
// "accepted ADDR" for every connection it takes (and closes), until its
// standard input closes.
const strangerEnv = "EP_TEST_STRANGER_ADDRS"

// strangerUID is the UID of the stranger of another user (tests as root).
const strangerUID = 60999

// runStranger is the stranger's main.
func runStranger(addrs string) int {
	var mu sync.Mutex
	say := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		_, _ = fmt.Fprintf(os.Stdout, format+"\n", args...)
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	var lns []net.Listener
	for _, a := range strings.Split(addrs, ",") {
		ln, err := lc.Listen(context.Background(), "tcp", a)
		if err != nil {
			say("refused %s %v", a, err)
			continue
		}
		say("bound %s", a)
		lns = append(lns, ln)
	}
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				say("accepted %s", ln.Addr())
				_ = c.Close()
			}
		}()
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	for _, ln := range lns {
		_ = ln.Close()
	}
	wg.Wait()
	return 0
}

// stranger is a running stranger process.
type stranger struct {
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	status   map[string]string // addr -> "bound" or the bind error
	accepted map[string]*atomic.Int64
	done     chan struct{}
}

// startStranger runs a stranger binding addrs, as the test's user or, with
// uid > 0, as that user; it returns once every bind has been tried.
func startStranger(t *testing.T, uid uint32, addrs ...string) *stranger {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if uid != 0 {
		exe = copyForUser(t, exe)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), strangerEnv+"="+strings.Join(addrs, ","))
	if uid != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &stranger{cmd: cmd, stdin: stdin, status: map[string]string{}, accepted: map[string]*atomic.Int64{}, done: make(chan struct{})}
	for _, a := range addrs {
		s.accepted[a] = &atomic.Int64{}
	}
	sc := bufio.NewScanner(stdout)
	for range addrs {
		if !sc.Scan() {
			t.Fatalf("the stranger ended before binding: %v", sc.Err())
		}
		f := strings.SplitN(sc.Text(), " ", 3)
		switch {
		case len(f) == 2 && f[0] == "bound":
			s.status[f[1]] = "bound"
		case len(f) == 3 && f[0] == "refused":
			s.status[f[1]] = f[2]
		default:
			t.Fatalf("the stranger said %q", sc.Text())
		}
	}
	go func() {
		defer close(s.done)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "accepted "); ok && s.accepted[a] != nil {
				s.accepted[a].Add(1)
			}
		}
	}()
	t.Cleanup(s.stop)
	return s
}

// stop ends the stranger and waits for it.
func (s *stranger) stop() {
	if s.stdin == nil {
		return
	}
	_ = s.stdin.Close()
	s.stdin = nil
	<-s.done
	_ = s.cmd.Wait()
}

// copyForUser copies the test binary where another user can run it.
func copyForUser(t *testing.T, exe string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "extractedprism-stranger-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	b, err := os.ReadFile(exe) //nolint:gosec // the test binary itself
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "stranger")
	if err := os.WriteFile(dst, b, 0o755); err != nil { //nolint:gosec // must be executable by the other user
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil { //nolint:gosec // as above
		t.Fatal(err)
	}
	return dst
}

// startLogged runs the daemon with cfg, its log in the returned buffer.
func startLogged(t *testing.T, cfg config.Config) (*running, *syncBuffer) {
	t.Helper()
	logs := &syncBuffer{}
	r := &running{cfg: cfg, reg: prometheus.NewRegistry(), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() {
		r.done <- Run(ctx, Options{Config: cfg, Registry: r.reg, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return")
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs.String())
		}
	})
	waitFor(t, "admin server", 20*time.Second, func() bool { code, _ := r.admin("/healthz"); return code == 200 })
	return r, logs
}

func (r *running) strangers(t *testing.T, listener string) float64 {
	t.Helper()
	return testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_listener_strangers", map[string]string{"listener": listener}))
}

// TestNoOtherProcessCanJoinTheListeners: with the default configuration
// (reuse-port off), another process cannot bind the balancer's listener or
// admin port, whether it runs as the same user or another one.
func TestNoOtherProcessCanJoinTheListeners(t *testing.T) {
	a := startStandin(t, "a")
	cfg := baseConfig(t, a.Addr())
	if cfg.Listen.ReusePort {
		t.Fatal("listen.reuse_port is on by default")
	}
	r, _ := startLogged(t, cfg)
	uids := []uint32{0}
	if os.Geteuid() == 0 {
		uids = append(uids, strangerUID)
	}
	for _, uid := range uids {
		s := startStranger(t, uid, cfg.ListenAddr(), cfg.AdminAddr())
		for _, addr := range []string{cfg.ListenAddr(), cfg.AdminAddr()} {
			if got := s.status[addr]; !strings.Contains(got, "address already in use") {
				t.Errorf("a process of uid %d binding %s with SO_REUSEPORT: %s, want address already in use", uidOf(uid), addr, got)
			}
		}
		s.stop()
	}
	if n := r.strangers(t, "listen") + r.strangers(t, "admin"); n != 0 {
		t.Errorf("listener_strangers = %v, want 0", n)
	}
}

func uidOf(uid uint32) int {
	if uid == 0 {
		return os.Geteuid()
	}
	return int(uid)
}

// TestStrangerOnReusePortIsReportedAndNotSteeredTo: with reuse-port on,
// another user's process still cannot bind the ports; a process of the
// same user can, and the balancer names it (ERROR log with its pid,
// listener_strangers, /healthz degraded), steers nothing to it (it gets a
// hash share of new connections, not all of them), and forgets it when it
// is gone.
func TestStrangerOnReusePortIsReportedAndNotSteeredTo(t *testing.T) {
	a := startStandin(t, "a")
	cfg := baseConfig(t, a.Addr())
	cfg.Listen.ReusePort = true
	r, logs := startLogged(t, cfg)
	addrs := []string{cfg.ListenAddr(), cfg.AdminAddr()}

	if os.Geteuid() == 0 {
		other := startStranger(t, strangerUID, addrs...)
		for _, addr := range addrs {
			if got := other.status[addr]; !strings.Contains(got, "address already in use") {
				t.Errorf("a process of uid %d binding %s: %s, want address already in use", strangerUID, addr, got)
			}
		}
		other.stop()
	}

	s := startStranger(t, 0, addrs...)
	for _, addr := range addrs {
		if got := s.status[addr]; got != "bound" {
			t.Fatalf("a process of the same uid binding %s with SO_REUSEPORT: %s", addr, got)
		}
	}
	pid := strconv.Itoa(s.cmd.Process.Pid)
	waitFor(t, "both strangers counted", 10*time.Second, func() bool {
		return r.strangers(t, "listen") == 1 && r.strangers(t, "admin") == 1
	})
	for _, name := range []string{"listen", "admin"} {
		if !strings.Contains(logs.String(), "level=ERROR") || !strings.Contains(logs.String(), "listener="+name) ||
			!strings.Contains(logs.String(), "pid="+pid) {
			t.Errorf("no ERROR line names the stranger (pid %s) on the %s port:\n%s", pid, name, logs.String())
		}
	}
	// /healthz answers 200 (a restart would not help) and says degraded;
	// the stranger may take the request itself, so ask until we answer.
	var health string
	waitFor(t, "/healthz from the balancer", 10*time.Second, func() bool {
		code, body := r.admin("/healthz")
		health = body
		return code == 200
	})
	if !strings.Contains(health, "degraded") || !strings.Contains(health, "pid "+pid) {
		t.Errorf("/healthz = %q, want degraded naming pid %s", health, pid)
	}

	// New connections: the stranger gets a share, never all of them.
	const n = 40
	before := testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_accepted_connections_total", nil))
	for range n {
		c, err := net.DialTimeout("tcp", cfg.ListenAddr(), 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.Close()
	}
	var ours, theirs float64
	waitFor(t, "every connect accepted by someone", 10*time.Second, func() bool {
		ours = testutil.ToFloat64(mustCounter(t, r.reg, "extractedprism_accepted_connections_total", nil)) - before
		theirs = float64(s.accepted[cfg.ListenAddr()].Load())
		return ours+theirs == n
	})
	t.Logf("of %d new connections the balancer took %v, the stranger %v", n, ours, theirs)
	if theirs == n || ours == 0 {
		t.Errorf("the stranger took %v of %d new connections: steering hands it everything", theirs, n)
	}

	s.stop()
	waitFor(t, "the strangers forgotten", 10*time.Second, func() bool {
		return r.strangers(t, "listen") == 0 && r.strangers(t, "admin") == 0
	})
	if code, body := r.admin("/healthz"); code != 200 || strings.Contains(body, "degraded") {
		t.Errorf("/healthz after the stranger left = %d %q", code, body)
	}
}

// TestStrangerIsNoSuccessor: a draining balancer hands its port over only
// to another extractedprism of its own (one that answers the listener
// handshake), never to another process that bound the port.
func TestStrangerIsNoSuccessor(t *testing.T) {
	ln, err := proxy.Listen(context.Background(), "127.0.0.1:0", true)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	s := startStranger(t, 0, ln.Addr().String())
	if s.status[ln.Addr().String()] != "bound" {
		t.Fatalf("the stranger could not bind: %s", s.status[ln.Addr().String()])
	}
	if proxy.OtherListener(ln) {
		t.Fatal("a stranger on the port counts as a successor")
	}
	succ, err := proxy.Listen(context.Background(), ln.Addr().String(), true)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = succ.Close() }()
	if !proxy.OtherListener(ln) {
		t.Fatal("a successor of ours does not count next to a stranger")
	}
}

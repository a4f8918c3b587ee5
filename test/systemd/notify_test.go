package systemd_test

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	standinlib "github.com/extractedprism/extractedprism/internal/standin"
	"github.com/extractedprism/extractedprism/pkg/status"
)

var (
	daemonOnce sync.Once
	daemonPath string
	daemonErr  error
)

// daemonBinary builds cmd/extractedprism once per test run.
func daemonBinary(t *testing.T) string {
	t.Helper()
	daemonOnce.Do(func() {
		dir, err := os.MkdirTemp("", "extractedprism-sdnotify-")
		if err != nil {
			daemonErr = err
			return
		}
		daemonPath = filepath.Join(dir, "extractedprism")
		out, err := exec.Command("go", "build", "-o", daemonPath, "github.com/extractedprism/extractedprism/cmd/extractedprism").CombinedOutput()
		if err != nil {
			daemonErr = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if daemonErr != nil {
		t.Fatal(daemonErr)
	}
	t.Cleanup(func() { _ = os.RemoveAll(filepath.Dir(daemonPath)) })
	return daemonPath
}

// notification is one sd_notify datagram and when it arrived.
type notification struct {
	at  time.Time
	msg string
}

// notifyListener is the test's stand-in for systemd's notify socket.
type notifyListener struct {
	path string
	conn *net.UnixConn
	ch   chan notification
	done chan struct{}
}

func listenNotify(t *testing.T) *notifyListener {
	t.Helper()
	dir, err := os.MkdirTemp("", "sdnotify")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	n := &notifyListener{path: path, conn: conn, ch: make(chan notification, 4096), done: make(chan struct{})}
	go func() {
		defer close(n.done)
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			n.ch <- notification{at: time.Now(), msg: string(buf[:k])}
		}
	}()
	t.Cleanup(func() { _ = conn.Close(); <-n.done })
	return n
}

// next returns the next message whose first line starts with one of the
// prefixes, skipping others (WATCHDOG=1, STATUS=) into skipped.
func (n *notifyListener) next(t *testing.T, d time.Duration, skipped *[]notification, prefixes ...string) notification {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case m := <-n.ch:
			for _, p := range prefixes {
				if strings.HasPrefix(m.msg, p) {
					return m
				}
			}
			if skipped != nil {
				*skipped = append(*skipped, m)
			}
		case <-deadline:
			t.Fatalf("no notify message starting with %q within %v", prefixes, d)
		}
	}
}

func getStatus(t *testing.T, admin string) status.Document {
	t.Helper()
	var doc status.Document
	resp, err := http.Get("http://" + admin + "/status")
	if err != nil {
		t.Fatalf("GET /status: %v", err)
	}
	defer func() { _ = resp.Body.Close() }()
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatalf("GET /status: %v", err)
	}
	return doc
}

func readyzCode(t *testing.T, admin string) int {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/readyz")
	if err != nil {
		t.Fatalf("GET /readyz: %v", err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode
}

// TestDaemonUnderServiceManagerProtocols runs the real daemon the way
// systemd runs extractedprism.service: an inherited listening socket
// (LISTEN_FDS), a notify socket, and the watchdog. It checks READY=1 is sent
// when the proxy is ready, STATUS=, WATCHDOG=1 at half of WATCHDOG_USEC,
// RELOADING=1 and READY=1 around a SIGHUP reload, STOPPING=1 at SIGTERM, and
// that the daemon leaves the inherited socket listening when it exits.
func TestDaemonUnderServiceManagerProtocols(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the daemon binary")
	}
	bin := daemonBinary(t)
	ctx := t.Context()
	logger := slog.New(slog.DiscardHandler)
	var ups []*standinlib.Server
	for _, name := range []string{"a", "b"} {
		s, err := standinlib.Start(ctx, standinlib.Options{Addr: "127.0.0.1:0", Name: name, Logger: logger})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		ups = append(ups, s)
	}

	// The proxy socket is made here and inherited, as systemd would pass it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lnFile, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	proxyAddr := ln.Addr().String()
	defer func() { _ = ln.Close(); _ = lnFile.Close() }()
	adminPort := freePort(t)
	admin := fmt.Sprintf("127.0.0.1:%d", adminPort)

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.yaml")
	writeConfig := func(endpoints ...string) {
		t.Helper()
		cfg := fmt.Sprintf("listen:\n  address: 127.0.0.1\n  port: %d\nadmin:\n  port: %d\nendpoints: [%s]\n"+
			"probe:\n  interval: 1s\n  timeout: 500ms\n  rise: 1\ndiscovery:\n  state_file: \"\"\nproxy:\n  drain_timeout: 2s\n",
			ln.Addr().(*net.TCPAddr).Port, adminPort, quoted(endpoints))
		if err := os.WriteFile(cfgPath+".tmp", []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(cfgPath+".tmp", cfgPath); err != nil {
			t.Fatal(err)
		}
	}
	writeConfig(ups[0].Addr())

	// A client that connected while no daemon ran (as during a restart) is
	// queued in the socket's backlog; the daemon must serve it once it starts.
	early, err := net.DialTimeout("tcp", proxyAddr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	type answer struct {
		name string
		err  error
	}
	earlyDone := make(chan answer, 1)
	go func() {
		name, err := requestOn(early, time.Minute)
		earlyDone <- answer{name, err}
	}()

	notify := listenNotify(t)
	const watchdog = time.Second
	// systemd sets LISTEN_PID and WATCHDOG_PID to the service's pid between
	// fork and exec; sh -c 'exec' keeps its own pid for the daemon.
	cmd := exec.Command("/bin/sh", "-c", `export LISTEN_PID=$$ WATCHDOG_PID=$$; exec "$0" "$@"`,
		bin, "--config", cfgPath)
	cmd.Env = append(os.Environ(), "LISTEN_FDS=1", "LISTEN_FDNAMES=extractedprism",
		"NOTIFY_SOCKET="+notify.path, fmt.Sprintf("WATCHDOG_USEC=%d", watchdog.Microseconds()))
	cmd.ExtraFiles = []*os.File{lnFile}
	stderr := &syncWriter{w: &strings.Builder{}}
	cmd.Stderr = stderr
	started := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var exitErr error
	go func() { exitErr = cmd.Wait(); close(exited) }()
	defer func() {
		select {
		case <-exited:
		default:
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("daemon stderr:\n%s", tail(stderr.String(), 40))
		}
	}()

	var before []notification
	ready := notify.next(t, time.Minute, &before, "READY=1")
	// At READY=1 the proxy must already be ready: systemctl start returns now.
	if code := readyzCode(t, admin); code != http.StatusOK {
		t.Fatalf("/readyz = %d when READY=1 arrived (%v after start), want 200", code, ready.at.Sub(started))
	}
	doc := getStatus(t, admin)
	if doc.Listen != proxyAddr {
		t.Errorf("/status listen = %q, want the inherited socket %s", doc.Listen, proxyAddr)
	}
	if len(doc.Upstreams) != 1 || doc.Upstreams[0].LastProbe.IsZero() || doc.Upstreams[0].LastProbe.After(ready.at) {
		t.Errorf("at READY=1 the upstream was not probed yet: %+v", doc.Upstreams)
	}
	statusSeen := false
	for _, m := range before {
		statusSeen = statusSeen || strings.HasPrefix(m.msg, "STATUS=1/1 upstreams healthy")
	}
	if !statusSeen {
		t.Errorf("no STATUS=1/1 upstreams healthy... before READY=1; got %+v", before)
	}
	if !strings.Contains(stderr.String(), "using socket-activated listener") {
		t.Errorf("daemon did not log that it uses the inherited socket")
	}
	// Served on the inherited socket: our copy accepts nothing.
	if name, err := requestThrough(ctx, proxyAddr); err != nil || name != "a" {
		t.Fatalf("request through the inherited socket: %q, %v; want an answer from a", name, err)
	}

	select {
	case a := <-earlyDone:
		if a.err != nil || a.name != "a" {
			t.Errorf("the connection queued before the daemon started got %q, %v; want it served by a", a.name, a.err)
		}
	case <-time.After(time.Minute):
		t.Errorf("the connection queued before the daemon started got no answer within a minute")
	}

	// WATCHDOG=1 at half of WATCHDOG_USEC.
	var pings []time.Time
	for len(pings) < 5 {
		pings = append(pings, notify.next(t, 30*time.Second, nil, "WATCHDOG=1").at)
	}
	var gaps []time.Duration
	for i := 1; i < len(pings); i++ {
		gaps = append(gaps, pings[i].Sub(pings[i-1]))
	}
	slices.Sort(gaps)
	if gaps[0] < watchdog/4 || gaps[len(gaps)/2] >= watchdog {
		t.Errorf("watchdog ping gaps %v with WATCHDOG_USEC=%v, want about %v", gaps, watchdog, watchdog/2)
	}

	// Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1, then the new config is live.
	writeConfig(ups[0].Addr(), ups[1].Addr())
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	reloading := notify.next(t, 30*time.Second, nil, "RELOADING=1")
	if !strings.Contains(reloading.msg, "\nMONOTONIC_USEC=") {
		t.Errorf("reload notification %q lacks MONOTONIC_USEC", reloading.msg)
	}
	notify.next(t, 30*time.Second, nil, "READY=1")
	if err := waitFor(30*time.Second, func() bool { return len(getStatus(t, admin).Upstreams) == 2 }); err != nil {
		t.Errorf("after RELOADING=1/READY=1 /status lists %d upstreams, want 2: %v", len(getStatus(t, admin).Upstreams), err)
	}

	// SIGTERM: STOPPING=1, exit 0, and the inherited socket still listens.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	notify.next(t, 30*time.Second, nil, "STOPPING=1")
	select {
	case <-exited:
		if exitErr != nil {
			t.Errorf("daemon exit after SIGTERM: %v, want status 0", exitErr)
		}
	case <-time.After(time.Minute):
		t.Fatal("daemon did not exit within a minute of SIGTERM")
	}
	// systemd keeps its copy of the socket: connects must still be queued, not refused.
	conn, err := net.DialTimeout("tcp", proxyAddr, 10*time.Second)
	if err != nil {
		t.Fatalf("connect to %s after the daemon exited: %v; the daemon must not shut the shared socket down", proxyAddr, err)
	}
	_ = conn.Close()
}

// syncWriter serialises writes from exec's copying goroutine and reads.
type syncWriter struct {
	mu sync.Mutex
	w  *strings.Builder
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func (s *syncWriter) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.String()
}

func quoted(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = fmt.Sprintf("%q", s)
	}
	return strings.Join(q, ", ")
}

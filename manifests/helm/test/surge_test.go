package charttest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// echoServer stands in for an API server in tcp probe mode: it echoes
// every line back. It returns its address.
func echoServer(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { _ = c.Close() }()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() {
		_ = l.Close()
		wg.Wait()
	})
	return l.Addr().String()
}

// instance is one running daemon, as one pod of the DaemonSet on a node.
type instance struct {
	cmd  *exec.Cmd
	done chan error
	logs *bytes.Buffer
}

func start(t *testing.T, daemon string, args []string) *instance {
	t.Helper()
	in := &instance{cmd: exec.Command(daemon, args...), done: make(chan error, 1), logs: &bytes.Buffer{}}
	in.cmd.Stdout, in.cmd.Stderr = in.logs, in.logs
	if err := in.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { in.done <- in.cmd.Wait() }()
	t.Cleanup(func() {
		_ = in.cmd.Process.Kill()
		err := <-in.done
		in.done <- err
		if t.Failed() {
			t.Logf("daemon %d output:\n%s", in.cmd.Process.Pid, in.logs.String())
		}
	})
	return in
}

// exited reports whether the instance has ended (and puts the result back).
func (in *instance) exited() (error, bool) {
	select {
	case err := <-in.done:
		in.done <- err
		return err, true
	default:
		return nil, false
	}
}

// migrateQueuedConnects sets net.ipv4.tcp_migrate_req=1 for the test, as
// docs/helm.md asks of nodes whose kernel cannot attach the reuseport BPF
// program that steers new connects to the newest daemon (the daemon warns
// at start when neither is in place). It restores the old value.
func migrateQueuedConnects(t *testing.T) {
	t.Helper()
	const knob = "/proc/sys/net/ipv4/tcp_migrate_req"
	old, err := os.ReadFile(knob)
	if err != nil {
		t.Skipf("kernel without %s: %v", knob, err)
	}
	if strings.TrimSpace(string(old)) == "1" {
		return
	}
	if err := os.WriteFile(knob, []byte("1\n"), 0o644); err != nil {
		t.Skipf("cannot set net.ipv4.tcp_migrate_req=1 for the handover (not root?): %v", err)
	}
	t.Cleanup(func() { _ = os.WriteFile(knob, old, 0o644) })
}

// TestSurgedPodTakesOver plays a rolling update with maxSurge on one node:
// a second daemon starts with the same flags while the first runs, the first
// gets SIGTERM once the second is up, and a client connecting in a loop all
// along must never be refused.
func TestSurgedPodTakesOver(t *testing.T) {
	helm, daemon := tools(t)
	migrateQueuedConnects(t)
	upstream := echoServer(t)
	r := render(t, helm,
		"--set", "endpoints="+upstream,
		"--set", "enableDiscovery=false",
		"--set", fmt.Sprintf("bindPort=%d", freePort(t)),
		"--set", fmt.Sprintf("healthPort=%d", freePort(t)),
		"--set", "updateStrategy.maxSurge=1",
		"--set", "updateStrategy.maxUnavailable=0",
		"--set", "extraArgs={--probe-mode=tcp}")
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(r.config), 0o600); err != nil {
		t.Fatal(err)
	}
	var args []string
	var listen string
	for _, a := range r.container.Args {
		switch {
		case a == configFlag:
			a = "--config=" + path
		case strings.HasPrefix(a, "--bind-port="):
			listen = "127.0.0.1:" + strings.TrimPrefix(a, "--bind-port=")
		}
		args = append(args, a)
	}
	ready := r.container.ReadinessProbe.url()

	old := start(t, daemon, args)
	get(t, ready, http.StatusOK, 30*time.Second)

	// Node-local clients connecting all the time, as kubelet and friends do.
	ctx, cancel := context.WithCancel(context.Background())
	var attempts, failures atomic.Int64
	var lastErr atomic.Value
	var clients sync.WaitGroup
	for range 4 {
		clients.Add(1)
		go func() {
			defer clients.Done()
			for ctx.Err() == nil {
				attempts.Add(1)
				if err := roundTrip(listen); err != nil {
					failures.Add(1)
					lastErr.Store(err.Error())
				}
			}
		}()
	}
	stopClient := func() {
		cancel()
		clients.Wait()
	}
	defer stopClient()

	surged := start(t, daemon, args)
	// The surged instance must stay up next to the old one; the liveness
	// answer may come from either, so wait for a few of the client's
	// connections and check the new process is still running.
	waitFor(t, 30*time.Second, "client connections while both instances run", func() bool {
		if err, done := surged.exited(); done {
			out := surged.logs.String()
			if strings.Contains(out, "admin address") && strings.Contains(out, "address already in use") {
				t.Skipf("the daemon binds the health port without SO_REUSEPORT, so a surged pod cannot start next to the old one (%v): %s",
					err, strings.TrimSpace(lastLine(out)))
			}
			t.Fatalf("surged instance exited while the old one runs: %v", err)
		}
		return attempts.Load() > 200
	})
	if err := old.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Duration(r.grace)*time.Second, "old instance to exit after SIGTERM", func() bool {
		_, done := old.exited()
		return done
	})
	if err, _ := old.exited(); err != nil {
		t.Errorf("old instance exited with %v after SIGTERM", err)
	}
	get(t, ready, http.StatusOK, 30*time.Second)
	before := attempts.Load()
	waitFor(t, 30*time.Second, "client connections to the surged instance alone", func() bool {
		return attempts.Load() > before+200
	})
	stopClient()
	if f := failures.Load(); f > 0 {
		t.Fatalf("%d of %d client connections failed during the takeover, last: %v", f, attempts.Load(), lastErr.Load())
	}
	t.Logf("%d client connections, none failed", attempts.Load())
}

// roundTrip connects through the local endpoint and echoes one line.
func roundTrip(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	if err := c.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if line != "ping\n" {
		return fmt.Errorf("echo %q", line)
	}
	return nil
}

func waitFor(t *testing.T, deadline time.Duration, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(deadline)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", deadline, what)
		}
		time.Sleep(20 * time.Millisecond) // poll interval, not synchronisation
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

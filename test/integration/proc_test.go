//go:build linux

package integration

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Generous deadlines: the tests must pass on a loaded 2-core machine with
// race-instrumented binaries.
const (
	startTimeout = 60 * time.Second
	waitTimeout  = 30 * time.Second
	pollEvery    = 20 * time.Millisecond
)

// childEnv is added to every child's environment: race-instrumented
// children exit at once instead of after the race runtime's default one
// second pause, so measured exit times are the daemon's own.
var childEnv = []string{"GORACE=atexit_sleep_ms=0"}

// logBuffer collects a child's output; safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// proc is a child process whose output is kept for assertions and for the
// test log on failure.
type proc struct {
	t       testing.TB
	label   string
	cmd     *exec.Cmd
	stdout  *logBuffer // stdout only
	out     *logBuffer // stdout and stderr interleaved
	done    chan struct{}
	state   *os.ProcessState
	started time.Time
}

// startProc starts argv[0] with argv[1:]. Inherited EP_* variables are
// dropped so the host environment cannot change what is tested; env is
// added. The child is killed (and waited for) when the test ends, and is
// sent SIGKILL if the test binary dies first.
func startProc(t testing.TB, label string, env []string, argv ...string) *proc {
	t.Helper()
	p := &proc{t: t, label: label, stdout: &logBuffer{}, out: &logBuffer{}, done: make(chan struct{})}
	cmd := exec.Command(argv[0], argv[1:]...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "EP_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, childEnv...)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout = io.MultiWriter(p.stdout, p.out)
	cmd.Stderr = p.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", label, err)
	}
	p.cmd, p.started = cmd, time.Now()
	go func() {
		_ = cmd.Wait()
		p.state = cmd.ProcessState
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		<-p.done
		out := p.out.String()
		if strings.Contains(out, "WARNING: DATA RACE") {
			t.Errorf("%s reported a data race:\n%s", label, out)
			return
		}
		if t.Failed() {
			const max = 24 << 10
			if len(out) > max {
				out = "...\n" + out[len(out)-max:]
			}
			t.Logf("output of %s (%s):\n%s", label, strings.Join(argv, " "), out)
		}
	})
	return p
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("signal %v to %s: %v", sig, p.label, err)
	}
}

// kill sends SIGKILL unless the process has ended already.
func (p *proc) kill() {
	if !p.exited() {
		_ = p.cmd.Process.Kill()
	}
}

// wait waits up to d for the process to end and returns its exit code
// (-1 if killed by a signal).
func (p *proc) wait(d time.Duration) (code int, ok bool) {
	select {
	case <-p.done:
		return p.state.ExitCode(), true
	case <-time.After(d):
		return 0, false
	}
}

// waitOutput polls the output until it contains s; it fails the test if
// the process ends first or d passes.
func (p *proc) waitOutput(s string, d time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(p.out.String(), s) {
		if p.exited() && !strings.Contains(p.out.String(), s) {
			p.t.Fatalf("%s exited (%v) before printing %q", p.label, p.state, s)
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s did not print %q within %s", p.label, s, d)
		}
		time.Sleep(pollEvery)
	}
}

// waitFor polls cond until it reports true or d passes; then the test
// fails with what, and the last detail cond gave.
func waitFor(t testing.TB, d time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(d)
	for {
		ok, detail := cond()
		if ok {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; last: %s", d, what, detail)
		}
		time.Sleep(pollEvery)
	}
}

var (
	portMu    sync.Mutex
	portsUsed = map[int]bool{}
)

// freePort returns a loopback TCP port that is free now. Ports come from
// below the usual ephemeral range, so outgoing connections of this or
// another process do not take them meanwhile, and each is handed out once
// per run.
func freePort(t testing.TB) int {
	t.Helper()
	return freePortOn(t, "127.0.0.1")
}

// freePortOn is freePort for another loopback address (e.g. "::1").
func freePortOn(t testing.TB, host string) int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	for range 500 {
		p := 20000 + rand.IntN(12000)
		if portsUsed[p] {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(p)))
		if err != nil {
			continue
		}
		_ = ln.Close()
		portsUsed[p] = true
		return p
	}
	t.Fatal("no free loopback port found")
	return 0
}

func loopback(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

// isRefused reports whether err is a refused TCP connect.
func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

// describe formats a duration for the logs that feed the release notes.
func describe(d time.Duration) string {
	return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond))
}

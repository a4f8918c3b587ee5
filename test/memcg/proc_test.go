//go:build linux

package memcg

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Generous deadlines: the test must pass on a loaded 2-core machine.
const (
	startTimeout = 60 * time.Second
	pollEvery    = 50 * time.Millisecond
)

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

// proc is a child process whose output is kept for the test log.
type proc struct {
	label string
	cmd   *exec.Cmd
	out   *logBuffer
	done  chan struct{}
	state *os.ProcessState
}

// startProc starts argv; inherited EP_* variables are dropped so that the
// host environment cannot change what is tested. The child is killed when
// the test ends (and if the test binary dies first), and its output is
// logged if the test failed.
func startProc(t testing.TB, label string, argv ...string) *proc {
	t.Helper()
	p := &proc{label: label, out: &logBuffer{}, done: make(chan struct{})}
	cmd := exec.Command(argv[0], argv[1:]...) //nolint:gosec // the binaries under test
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "EP_") && !strings.HasPrefix(kv, "GOMEMLIMIT=") && !strings.HasPrefix(kv, "GOGC=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", label, err)
	}
	p.cmd = cmd
	go func() {
		_ = cmd.Wait()
		p.state = cmd.ProcessState
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.exited() {
			_ = cmd.Process.Kill()
		}
		<-p.done
		if t.Failed() {
			out := p.out.String()
			const max = 16 << 10
			if len(out) > max {
				out = "...\n" + out[len(out)-max:]
			}
			t.Logf("output of %s:\n%s", label, out)
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

// waitOutput polls the output until it contains s.
func (p *proc) waitOutput(t testing.TB, s string) {
	t.Helper()
	waitFor(t, startTimeout, fmt.Sprintf("%s to print %q", p.label, s), func() (bool, string) {
		if p.exited() {
			t.Fatalf("%s exited (%v) before printing %q", p.label, p.state, s)
		}
		return strings.Contains(p.out.String(), s), ""
	})
}

// rssBytes is the process's resident set size (VmRSS), -1 if it is gone.
func rssBytes(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return -1
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n << 10
		}
	}
	return -1
}

// waitFor polls cond until it reports true or d passes; then the test
// fails with what and the last detail cond gave.
func waitFor(t testing.TB, d time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		ok, detail := cond()
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > d {
			t.Fatalf("timed out after %s waiting for %s; last: %s", d, what, detail)
		}
		time.Sleep(pollEvery)
	}
}

var (
	portMu    sync.Mutex
	portsUsed = map[int]bool{}
)

// freePort returns a loopback port free now, below the ephemeral range so
// that outgoing connections do not take it meanwhile.
func freePort(t testing.TB) int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	for range 500 {
		p := 20000 + rand.IntN(12000)
		if portsUsed[p] {
			continue
		}
		ln, err := net.Listen("tcp", loopback(p))
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

// adminGet does GET http://addr<path> on a fresh connection.
func adminGet(addr, path string) (int, string, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return 0, "", err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

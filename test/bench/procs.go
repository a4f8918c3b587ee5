package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// proc is a child process in a process group of its own, so that a balancer
// with worker processes (nginx) can be measured and stopped as a whole.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	log  *os.File
}

// startProc starts bin with args; stderr (and stdout unless stdout is
// non-nil) go to a log file under dir.
func startProc(dir, name string, stdout io.Writer, bin string, args ...string) (*proc, error) {
	logf, err := os.OpenFile(filepath.Join(dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log for %s: %w", name, err)
	}
	cmd := exec.Command(bin, args...) //nolint:gosec // binaries under test, chosen by the harness
	cmd.Stderr = logf
	cmd.Stdout = logf
	if stdout != nil {
		cmd.Stdout = stdout
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = logf.Close()
		return nil, fmt.Errorf("start %s (%s): %w", name, bin, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{}), log: logf}
	go func() {
		p.err = cmd.Wait()
		_ = logf.Close()
		close(p.done)
	}()
	return p, nil
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

// signal sends sig to the process itself (not its group).
func (p *proc) signal(sig syscall.Signal) error {
	if p.exited() {
		return fmt.Errorf("%s already exited", p.name)
	}
	return syscall.Kill(p.pid(), sig)
}

// wait waits up to d for the process to exit.
func (p *proc) wait(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.done:
		return true
	case <-t.C:
		return false
	}
}

// stop sends SIGTERM to the group, waits up to grace, then SIGKILLs it.
func (p *proc) stop(grace time.Duration) {
	if !p.exited() {
		_ = syscall.Kill(-p.pid(), syscall.SIGCONT)
		_ = syscall.Kill(-p.pid(), syscall.SIGTERM)
	}
	if !p.wait(grace) {
		_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
		p.wait(10 * time.Second)
	}
	// Workers that outlived their master.
	_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
}

// groupPIDs lists the live processes in p's process group.
func (p *proc) groupPIDs() []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		f := statFields(pid)
		// Field 5 (index 2 after the command) is the process group.
		if len(f) > 2 && f[2] == strconv.Itoa(p.pid()) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// statFields returns /proc/PID/stat after the "(comm)" field: index 0 is
// the state (field 3 of proc(5)).
func statFields(pid int) []string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(s[i+1:])
}

// clockTick is USER_HZ, 100 on Linux.
const clockTick = 100

// cpuSeconds is the user+system CPU time used so far by the group's live
// processes.
func (p *proc) cpuSeconds() float64 {
	var ticks int64
	for _, pid := range p.groupPIDs() {
		f := statFields(pid)
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64) // utime, field 14
		s, _ := strconv.ParseInt(f[12], 10, 64) // stime, field 15
		ticks += u + s
	}
	return float64(ticks) / clockTick
}

// pssKiB is the proportional set size of the group (shared pages counted
// once across its processes).
func (p *proc) pssKiB() int64 {
	_, pss := p.memKiB()
	return pss
}

// memKiB is the resident and the proportional set size of the group's live
// processes (from /proc/PID/smaps_rollup), KiB. RSS counts a page shared
// by several of them once per process, PSS once in all.
func (p *proc) memKiB() (rss, pss int64) {
	for _, pid := range p.groupPIDs() {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok || (k != "Rss" && k != "Pss") {
				continue
			}
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if k == "Rss" {
				rss += n
			} else {
				pss += n
			}
		}
	}
	return rss, pss
}

// upstream is one stand-in apiserver process.
type upstream struct {
	name string
	addr string
	bin  string
	dir  string
	p    *proc
	log  *slog.Logger
	upstreamMode
}

// upstreamMode is how a scenario needs the stand-ins to run.
type upstreamMode struct {
	// handshake, when set, is the stand-in's --handshake-timeout (how long
	// a connection may take to send its TLS handshake and request headers).
	handshake time.Duration
	// auth runs the stand-in with --anonymous-auth=false: requests need
	// benchToken or the client certificate of the work directory's
	// client CA.
	auth bool
}

// benchToken is the bearer token the stand-ins accept with anonymous
// authentication off; probeTokenFile, in the work directory, holds it for
// the balancers' probes, and clientPKIDir there the client CA, certificate
// and key the first such stand-in writes.
const (
	benchToken     = "bench-probe-token-0123456789"
	probeTokenFile = "probe-token"
	clientPKIDir   = "client-pki"
	// servingCertPrefix names the serving certificates that stand-ins
	// with authentication write, so that a balancer sending a token can
	// verify them (a token goes only to a verified apiserver).
	servingCertPrefix = "serving-"
)

// start runs the stand-in and returns once it printed its listening line.
func (u *upstream) start(ctx context.Context) error {
	args := []string{"--listen", u.addr, "--name", u.name, "--live-while-unready", "--log-level", "warn"}
	if u.handshake > 0 {
		args = append(args, "--handshake-timeout", u.handshake.String())
	}
	pki := filepath.Join(u.dir, clientPKIDir)
	if u.auth {
		args = append(args, "--anonymous-auth=false", "--token", benchToken,
			"--cert-out", filepath.Join(u.dir, servingCertPrefix+u.name+".pem"))
		// The first stand-in writes the client CA and certificate, the
		// others (and its own later starts) trust that CA.
		if _, err := os.Stat(filepath.Join(pki, "ca.crt")); err == nil {
			args = append(args, "--client-ca-file", filepath.Join(pki, "ca.crt"))
		} else {
			args = append(args, "--client-cert-out", pki)
		}
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("pipe: %w", err)
	}
	p, err := startProc(u.dir, "upstream-"+u.name, pw, u.bin, args...)
	_ = pw.Close()
	if err != nil {
		_ = pr.Close()
		return err
	}
	u.p = p
	lines := make(chan string, 1)
	go func() {
		defer func() { _ = pr.Close() }()
		sc := bufio.NewScanner(pr)
		if sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		_, _ = io.Copy(io.Discard, pr)
	}()
	t := time.NewTimer(15 * time.Second)
	defer t.Stop()
	select {
	case l, ok := <-lines:
		if !ok || !strings.Contains(l, "listening on") {
			p.stop(time.Second)
			return fmt.Errorf("upstream %s on %s did not start (see %s): first line %q", u.name, u.addr, p.log.Name(), l)
		}
		if u.auth && clientCert.Load() == nil {
			c, err := tls.LoadX509KeyPair(filepath.Join(pki, "client.crt"), filepath.Join(pki, "client.key"))
			if err != nil {
				return fmt.Errorf("upstream %s: client certificate: %w", u.name, err)
			}
			clientCert.Store(&c)
		}
		return nil
	case <-t.C:
		p.stop(time.Second)
		return fmt.Errorf("upstream %s on %s: no listening line within 15 s", u.name, u.addr)
	case <-ctx.Done():
		p.stop(time.Second)
		return ctx.Err()
	}
}

// kill SIGKILLs the stand-in and waits for it.
func (u *upstream) kill() {
	if u.p != nil && !u.p.exited() {
		_ = u.p.signal(syscall.SIGKILL)
		u.p.wait(10 * time.Second)
	}
}

// terminate sends SIGTERM (graceful shutdown) and waits up to 15 s.
func (u *upstream) terminate() error {
	if u.p == nil || u.p.exited() {
		return nil
	}
	if err := u.p.signal(syscall.SIGTERM); err != nil {
		return err
	}
	if !u.p.wait(15 * time.Second) {
		u.p.stop(time.Second)
		return errors.New("upstream " + u.name + " ignored SIGTERM for 15 s")
	}
	return nil
}

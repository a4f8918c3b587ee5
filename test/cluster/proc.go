package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Procs starts child processes and keeps track of them, so that a run can
// stop every one it started.
type Procs struct {
	// Dir is the processes' working directory and HOME.
	Dir string
	// LogDir holds one NAME.log a process name.
	LogDir string
	// LogMode is the log files' permission bits.
	LogMode os.FileMode

	mu   sync.Mutex
	list []*Proc
}

// Proc is a child process with its output in a log file.
type Proc struct {
	Name string
	// Args is the command line, the binary first.
	Args []string
	Cmd  *exec.Cmd
	Log  string
	// Err is what Wait said; read it only once the process has exited.
	Err  error
	done chan struct{}
}

// Start runs bin with args, its output appended to LogDir/NAME.log (a
// restart of NAME appends to the same file). The process dies with the
// test binary, whatever happens to it, and is in a process group of its
// own.
func (ps *Procs) Start(name, bin string, args ...string) (*Proc, error) {
	if err := os.MkdirAll(ps.LogDir, 0o755); err != nil {
		return nil, err
	}
	mode := ps.LogMode
	if mode == 0 {
		mode = 0o600
	}
	logPath := filepath.Join(ps.LogDir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, mode)
	if err != nil {
		return nil, fmt.Errorf("log file: %w", err)
	}
	_, _ = fmt.Fprintf(f, "=== %s %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Dir = ps.Dir
	cmd.Env = append(os.Environ(), "HOME="+ps.Dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, Args: append([]string{bin}, args...), Cmd: cmd, Log: logPath, done: make(chan struct{})}
	go func() {
		p.Err = cmd.Wait()
		_ = f.Close()
		close(p.done)
	}()
	ps.mu.Lock()
	ps.list = append(ps.list, p)
	ps.mu.Unlock()
	return p, nil
}

// List returns the processes started so far, oldest first.
func (ps *Procs) List() []*Proc {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return slices.Clone(ps.list)
}

// KillAll kills every process still running and waits for it.
func (ps *Procs) KillAll() {
	for _, p := range ps.List() {
		p.Kill()
	}
}

// StopAll stops every process still running, newest first, each with
// SIGTERM and after timeout SIGKILL.
func (ps *Procs) StopAll(timeout time.Duration) {
	procs := ps.List()
	for i := len(procs) - 1; i >= 0; i-- {
		if procs[i].Running() {
			_ = procs[i].Stop(timeout)
		}
	}
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Running reports whether the process has not exited.
func (p *Proc) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Signal sends sig to the process while it runs.
func (p *Proc) Signal(sig syscall.Signal) {
	if p.Running() {
		_ = p.Cmd.Process.Signal(sig)
	}
}

// Wait waits up to timeout for the process to exit.
func (p *Proc) Wait(timeout time.Duration) error {
	select {
	case <-p.done:
		return p.Err
	case <-time.After(timeout):
		return fmt.Errorf("%s (pid %d) still running after %s", p.Name, p.Cmd.Process.Pid, timeout)
	}
}

// Kill ends the process and waits for it.
func (p *Proc) Kill() {
	p.Signal(syscall.SIGKILL)
	<-p.done
}

// Stop sends SIGTERM, waits up to timeout and then kills.
func (p *Proc) Stop(timeout time.Duration) error {
	p.Signal(syscall.SIGTERM)
	err := p.Wait(timeout)
	if p.Running() {
		p.Kill()
	}
	return err
}

// Tail returns the last n lines of the process log.
func (p *Proc) Tail(n int) string { return TailFile(p.Log, n) }

// TailFile returns the last n lines of a file.
func TailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

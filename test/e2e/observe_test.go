package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// kubectlRun is one kubectl command of the load loop.
type kubectlRun struct {
	start, end time.Time
	err        error
}

// loadLoop runs `kubectl get configmaps` through extractedprism, one after
// the other, and keeps every result.
type loadLoop struct {
	mu     sync.Mutex
	runs   []kubectlRun
	cancel context.CancelFunc
	done   chan struct{}
}

// startLoad starts the load loop with the admin credentials; stop it with
// stop (also at test end).
func (e *environment) startLoad(t *testing.T) *loadLoop {
	t.Helper()
	return e.startLoadWith(t, func(ctx context.Context) error {
		_, err := e.Kubectl(ctx, proxyAddr, "", "get", "configmaps", "-n", "default", "-o", "name")
		return err
	})
}

// startLoadWith starts a load loop running run (one kubectl command) again
// and again; stop it with stop (also at test end).
func (e *environment) startLoadWith(t *testing.T, run func(context.Context) error) *loadLoop {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	l := &loadLoop{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for ctx.Err() == nil {
			start := time.Now()
			rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
			err := run(rctx)
			rcancel()
			if ctx.Err() != nil {
				return
			}
			l.mu.Lock()
			l.runs = append(l.runs, kubectlRun{start: start, end: time.Now(), err: err})
			l.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(l.stop)
	return l
}

func (l *loadLoop) stop() {
	l.cancel()
	<-l.done
}

// between counts the commands started in [from, to] and their failures.
func (l *loadLoop) between(from, to time.Time) (total int, failed []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.runs {
		if r.start.Before(from) || r.start.After(to) {
			continue
		}
		total++
		if r.err != nil {
			failed = append(failed, fmt.Sprintf("%s: %v", r.start.Format("15:04:05.000"), r.err))
		}
	}
	return total, failed
}

// watchSession is one `kubectl get --watch` process.
type watchSession struct {
	start, end time.Time
	err        error
}

// watchLoop keeps a `kubectl get configmaps --watch` running through
// extractedprism, starting a new one whenever one ends, as a user's
// `while true` loop or any informer would.
type watchLoop struct {
	mu       sync.Mutex
	sessions []watchSession
	seen     map[string]time.Time
	// firstLines are when each session printed its first line.
	firstLines []time.Time
	cancel     context.CancelFunc
	done       chan struct{}
}

// startWatch starts the watch loop; it stops at test end.
func (e *environment) startWatch(t *testing.T) *watchLoop {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &watchLoop{cancel: cancel, done: make(chan struct{}), seen: map[string]time.Time{}}
	kc, err := e.TokenKubeconfig("admin", "https://"+proxyAddr, e.AdminToken)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(w.done)
		for ctx.Err() == nil {
			cmd := exec.CommandContext(ctx, e.Bins.Kubectl, "--kubeconfig="+kc,
				"--cache-dir="+filepath.Join(e.Dir, "kubectl-cache"),
				"get", "configmaps", "-n", "default", "--watch", "-o", "name")
			cmd.Env = append(os.Environ(), "HOME="+e.Dir)
			out, err := cmd.StdoutPipe()
			if err != nil {
				return
			}
			cmd.Stderr = nil
			start := time.Now()
			if err := cmd.Start(); err != nil {
				return
			}
			sc := bufio.NewScanner(out)
			first := true
			for sc.Scan() {
				name := strings.TrimSpace(sc.Text())
				w.mu.Lock()
				if first {
					w.firstLines = append(w.firstLines, time.Now())
					first = false
				}
				if _, ok := w.seen[name]; !ok {
					w.seen[name] = time.Now()
				}
				w.mu.Unlock()
			}
			err = cmd.Wait()
			w.mu.Lock()
			w.sessions = append(w.sessions, watchSession{start: start, end: time.Now(), err: err})
			w.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(w.stop)
	return w
}

func (w *watchLoop) stop() {
	w.cancel()
	<-w.done
}

// ended returns the sessions that ended in [from, to].
func (w *watchLoop) ended(from, to time.Time) []watchSession {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []watchSession
	for _, s := range w.sessions {
		if !s.end.Before(from) && !s.end.After(to) {
			out = append(out, s)
		}
	}
	return out
}

// sessionAfter returns when the first session that started at or after t
// printed its first line (or started, if it printed nothing).
func (w *watchLoop) sessionAfter(t time.Time) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	first := time.Time{}
	for _, s := range w.firstLines {
		if !s.Before(t) && (first.IsZero() || s.Before(first)) {
			first = s
		}
	}
	return first
}

// waitSeen waits until the watch printed name and returns when.
func (w *watchLoop) waitSeen(t *testing.T, name string, timeout time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		w.mu.Lock()
		at, ok := w.seen[name]
		w.mu.Unlock()
		if ok {
			return at
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the watch through extractedprism did not show %s within %s", name, timeout)
	return time.Time{}
}

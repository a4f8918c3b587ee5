package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// sliceObservation is the kubernetes EndpointSlice's ready addresses at a time.
type sliceObservation struct {
	at    time.Time
	addrs []string
}

// slicePoller reads the kubernetes EndpointSlice straight from the
// apiservers (not through extractedprism) every 50 ms, so that the tests can
// tell the apiservers' own delay from discovery's.
type slicePoller struct {
	mu     sync.Mutex
	seen   []sliceObservation
	cancel context.CancelFunc
	done   chan struct{}
}

// pollSlice starts a poller; it stops at test end.
func (e *environment) pollSlice(t *testing.T) *slicePoller {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	sp := &slicePoller{cancel: cancel, done: make(chan struct{})}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.caPool, MinVersion: tls.VersionTLS12}}
	client := &http.Client{Timeout: 2 * time.Second, Transport: tr}
	go func() {
		defer close(sp.done)
		defer tr.CloseIdleConnections()
		for ctx.Err() == nil {
			for _, ip := range apiserverIPs {
				addrs, err := e.readSlice(ctx, client, ip)
				if err == nil {
					sp.add(addrs)
					break
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(sp.stop)
	return sp
}

func (sp *slicePoller) stop() {
	sp.cancel()
	<-sp.done
}

func (sp *slicePoller) add(addrs []string) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if n := len(sp.seen); n > 0 && slices.Equal(sp.seen[n-1].addrs, addrs) {
		return
	}
	sp.seen = append(sp.seen, sliceObservation{at: time.Now(), addrs: addrs})
}

// readSlice fetches the ready addresses of the kubernetes EndpointSlice.
func (e *environment) readSlice(ctx context.Context, c *http.Client, ip string) ([]string, error) {
	url := "https://" + net.JoinHostPort(ip, "6443") + "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+e.adminToken)
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	var s struct {
		Endpoints []struct {
			Addresses  []string `json:"addresses"`
			Conditions struct {
				Ready *bool `json:"ready"`
			} `json:"conditions"`
		} `json:"endpoints"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return nil, fmt.Errorf("decode %s: %w", url, err)
	}
	var out []string
	for _, ep := range s.Endpoints {
		if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
			continue
		}
		for _, a := range ep.Addresses {
			out = append(out, net.JoinHostPort(a, "6443"))
		}
	}
	slices.Sort(out)
	return out, nil
}

// waitFor returns when the slice first satisfied cond at or after since,
// polling for up to timeout.
func (sp *slicePoller) waitFor(t *testing.T, what string, since time.Time, timeout time.Duration, cond func([]string) bool) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		sp.mu.Lock()
		var last []string
		for i, o := range sp.seen {
			// The observation in force at since counts from since.
			end := time.Now()
			if i+1 < len(sp.seen) {
				end = sp.seen[i+1].at
			}
			if end.Before(since) {
				continue
			}
			if cond(o.addrs) {
				sp.mu.Unlock()
				return maxTime(o.at, since)
			}
			last = o.addrs
		}
		sp.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("the kubernetes EndpointSlice did not reach %s within %s; last seen %v", what, timeout, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

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
		_, err := e.kubectl(ctx, proxyAddr, "", "get", "configmaps", "-n", "default", "-o", "name")
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
	kc, err := e.kubeconfig("admin", "https://"+proxyAddr, e.adminToken)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(w.done)
		for ctx.Err() == nil {
			cmd := exec.CommandContext(ctx, e.kubectlBin, "--kubeconfig="+kc,
				"--cache-dir="+filepath.Join(e.dir, "kubectl-cache"),
				"get", "configmaps", "-n", "default", "--watch", "-o", "name")
			cmd.Env = append(os.Environ(), "HOME="+e.dir)
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

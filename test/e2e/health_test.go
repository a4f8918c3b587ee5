package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

// healthDaemonArgs run extractedprism in front of every apiserver with the
// default health settings (probe every 2 s, rise 2, fall 2,
// close_on_down on) and no discovery, so that only the health logic decides
// where connections go.
func healthDaemonArgs(as []*apiserver) []string {
	eps := make([]string, len(as))
	for i, a := range as {
		eps[i] = a.Addr()
	}
	return []string{
		"--endpoints=" + strings.Join(eps, ","),
		"--bind-address=127.0.0.1", "--bind-port=7445",
		"--health-bind-address=127.0.0.1", "--health-port=7446",
		"--state-file=",
		"--drain-timeout=5s",
		"--log-level=debug",
	}
}

// TestHealthUnderStress runs extractedprism in front of three real
// apiservers through the stresses a node-local balancer meets on every node
// at once: clients that connect and never speak, an etcd outage that makes
// every apiserver unready while they keep serving watches, and a rolling
// restart of the apiservers with slow requests in flight. Each subtest can
// run on its own (go test -run 'TestHealthUnderStress/EtcdKilled').
func TestHealthUnderStress(t *testing.T) {
	as := []*apiserver{
		env.RunAPIServer(t, apiserverIPs[0]),
		env.RunAPIServer(t, apiserverIPs[1]),
		env.RunAPIServer(t, apiserverIPs[2]),
	}
	env.WaitReady(t, as...)
	d := env.startDaemon(t, healthDaemonArgs(as)...)
	healthy := func(t *testing.T) {
		t.Helper()
		env.WaitReady(t, as...)
		d.waitStatus(t, "every upstream up", 2*time.Minute, func(doc status.Document) bool {
			return doc.Ready && allUp(doc, len(as))
		})
	}
	healthy(t)

	t.Run("SilentConnections", func(t *testing.T) {
		healthy(t)
		testSilentConnections(t, d)
	})
	t.Run("EtcdStopped", func(t *testing.T) {
		healthy(t)
		testEtcdOutage(t, d, as, syscall.SIGSTOP)
	})
	t.Run("EtcdKilled", func(t *testing.T) {
		healthy(t)
		testEtcdOutage(t, d, as, syscall.SIGKILL)
	})
	t.Run("RollingRestartSlowList", func(t *testing.T) {
		healthy(t)
		testRollingRestart(t, d, as)
	})
	if err := d.p.Stop(time.Minute); err != nil {
		t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v\n%s", err, d.p.Tail(20))
	}
}

// allUp reports whether doc lists n upstreams, all up.
func allUp(doc status.Document, n int) bool {
	if len(doc.Upstreams) != n {
		return false
	}
	for _, u := range doc.Upstreams {
		if u.State != "up" {
			return false
		}
	}
	return true
}

// healthSample is one look at extractedprism's /readyz and /status.
type healthSample struct {
	at     time.Time
	readyz int // HTTP status, 0 when the request failed
	states map[string]string
	err    error
}

// healthMonitor polls /readyz and /status every 100 ms.
type healthMonitor struct {
	mu      sync.Mutex
	samples []healthSample
	cancel  context.CancelFunc
	done    chan struct{}
}

// monitorHealth starts a monitor; it stops at test end or with stop.
func monitorHealth(t *testing.T, d *daemon) *healthMonitor {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	m := &healthMonitor{cancel: cancel, done: make(chan struct{})}
	tr := &http.Transport{DisableKeepAlives: true}
	c := &http.Client{Timeout: 2 * time.Second, Transport: tr}
	go func() {
		defer close(m.done)
		for ctx.Err() == nil {
			s := healthSample{at: time.Now(), states: map[string]string{}}
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+adminAddr+"/readyz", nil)
			if resp, err := c.Do(req); err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				_ = resp.Body.Close()
				s.readyz = resp.StatusCode
			} else {
				s.err = err
			}
			if doc, err := d.status(); err == nil {
				for _, u := range doc.Upstreams {
					s.states[u.Address] = u.State
				}
			} else if s.err == nil {
				s.err = err
			}
			if ctx.Err() != nil {
				return
			}
			m.mu.Lock()
			m.samples = append(m.samples, s)
			m.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(m.stop)
	return m
}

func (m *healthMonitor) stop() {
	m.cancel()
	<-m.done
}

// healthSummary is what a monitor saw.
type healthSummary struct {
	samples, ready200 int
	// notUp counts, per upstream, the samples in which it was not up.
	notUp map[string]int
	// firstNotUp is when each upstream was first seen not up.
	firstNotUp map[string]time.Time
	// notReadyFor sums the time /readyz did not answer 200, counting each
	// failed sample until the next one.
	notReadyFor time.Duration
	errors      []string
}

// summary digests the samples taken in [from, to].
func (m *healthMonitor) summary(from, to time.Time) healthSummary {
	m.mu.Lock()
	defer m.mu.Unlock()
	h := healthSummary{notUp: map[string]int{}, firstNotUp: map[string]time.Time{}}
	for i, s := range m.samples {
		if s.at.Before(from) || s.at.After(to) {
			continue
		}
		h.samples++
		if s.readyz == http.StatusOK {
			h.ready200++
		} else {
			next := to
			if i+1 < len(m.samples) && m.samples[i+1].at.Before(to) {
				next = m.samples[i+1].at
			}
			h.notReadyFor += next.Sub(s.at)
		}
		if s.err != nil && len(h.errors) < 3 {
			h.errors = append(h.errors, s.err.Error())
		}
		for addr, st := range s.states {
			if st != "up" {
				h.notUp[addr]++
				if _, ok := h.firstNotUp[addr]; !ok {
					h.firstNotUp[addr] = s.at
				}
			}
		}
	}
	return h
}

// availability is the share of samples in which /readyz answered 200.
func (h healthSummary) availability() float64 {
	if h.samples == 0 {
		return 0
	}
	return float64(h.ready200) / float64(h.samples)
}

// metric reads a counter from extractedprism's /metrics, summed over its
// labels.
func metric(name string) (float64, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + adminAddr + "/metrics")
	if err != nil {
		return 0, fmt.Errorf("GET /metrics: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var sum float64
	found := false
	for sc.Scan() {
		line := sc.Text()
		i := strings.LastIndexByte(line, ' ')
		if i < 0 || strings.HasPrefix(line, "#") {
			continue
		}
		series := line[:i]
		if j := strings.IndexByte(series, '{'); j >= 0 {
			series = series[:j]
		}
		if series != name {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return 0, fmt.Errorf("/metrics: %q: %w", line, err)
		}
		sum += v
		found = true
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("read /metrics: %w", err)
	}
	if !found {
		return 0, fmt.Errorf("/metrics has no %s", name)
	}
	return sum, nil
}

// closedOnDown is extractedprism's count of connections it closed because
// their upstream was marked down.
func closedOnDown(t *testing.T) float64 {
	t.Helper()
	v, err := metric("extractedprism_closed_on_down_total")
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// upstreamConnections sums the connections extractedprism made to upstreams.
func upstreamConnections(doc status.Document) uint64 {
	var n uint64
	for _, u := range doc.Upstreams {
		n += u.TotalConnections
	}
	return n
}

// silentHold is how long the silent connections are held: longer than
// kube-apiserver's 32 s TLS handshake timeout (its ReadHeaderTimeout).
const silentHold = 60 * time.Second

// testSilentConnections holds 30 connections to extractedprism that never
// send a byte: the apiservers close them after their handshake timeout,
// which is the client's doing, not an apiserver failing, so no upstream may
// go down and /readyz must answer 200 throughout.
func testSilentConnections(t *testing.T, d *daemon) {
	const n = 30
	doc0, err := d.status()
	if err != nil {
		t.Fatal(err)
	}
	m := monitorHealth(t, d)
	start := time.Now()
	closed := make([]time.Duration, n)
	var wg sync.WaitGroup
	conns := make([]net.Conn, n)
	for i := range n {
		c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
		if err != nil {
			t.Fatalf("silent connection %d: %v", i, err)
		}
		conns[i] = c
		closed[i] = -1
		wg.Go(func() {
			// Never writes; learns when the balancer closes the connection.
			buf := make([]byte, 1)
			for {
				if _, err := c.Read(buf); err != nil {
					if !errors.Is(err, net.ErrClosed) {
						closed[i] = time.Since(start)
					}
					return
				}
			}
		})
	}
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
		wg.Wait()
	}()
	for time.Since(start) < silentHold {
		if !d.p.Running() {
			t.Fatalf("extractedprism exited with silent connections open: %v\n%s", d.p.Err, d.p.Tail(30))
		}
		time.Sleep(200 * time.Millisecond)
	}
	end := time.Now()
	m.stop()
	doc1, err := d.status()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range conns {
		_ = c.Close()
	}
	wg.Wait()

	h := m.summary(start, end)
	var ends []time.Duration
	for _, c := range closed {
		if c >= 0 {
			ends = append(ends, c)
		}
	}
	slices.Sort(ends)
	fate := fmt.Sprintf("%d of %d still open at %s", n-len(ends), n, silentHold)
	if len(ends) > 0 {
		fate = fmt.Sprintf("%d of %d closed by extractedprism (first %.1f s, last %.1f s after connecting), %d still open at %s",
			len(ends), n, ends[0].Seconds(), ends[len(ends)-1].Seconds(), n-len(ends), silentHold)
	}
	env.Record("silent connections (%d for %s): /readyz 200 in %.1f %% of %d samples (not ready for %.1f s); upstream not up in samples: %v; %s; upstream connections made for them: %d",
		n, silentHold, 100*h.availability(), h.samples, h.notReadyFor.Seconds(), h.notUp, fate,
		upstreamConnections(doc1)-upstreamConnections(doc0))
	if h.samples < int(silentHold/time.Second) {
		t.Errorf("only %d health samples in %s (errors: %v)", h.samples, silentHold, h.errors)
	}
	if h.ready200 != h.samples {
		t.Errorf("/readyz did not answer 200 in %d of %d samples (%.1f s) while every apiserver was fine; first errors %v",
			h.samples-h.ready200, h.samples, h.notReadyFor.Seconds(), h.errors)
	}
	for addr, k := range h.notUp {
		t.Errorf("upstream %s was not up in %d samples (first at +%.1f s) although only silent clients misbehaved",
			addr, k, h.firstNotUp[addr].Sub(start).Seconds())
	}
}

// watchStream is one raw watch request through extractedprism, on a TCP
// connection of its own.
type watchStream struct {
	mu    sync.Mutex
	seen  map[string]time.Time
	ended time.Time
	err   error // nil: the apiserver ended the response cleanly
	done  chan struct{}
	tr    *http.Transport
}

// openWatch starts a watch of the default namespace's configmaps from
// resourceVersion rv.
func openWatch(ctx context.Context, rv string) (*watchStream, error) {
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: env.CA.Pool, MinVersion: tls.VersionTLS12},
		DisableKeepAlives: true,
	}
	url := "https://" + proxyAddr + "/api/v1/namespaces/default/configmaps?watch=1&allowWatchBookmarks=true&timeoutSeconds=1800&resourceVersion=" + rv
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+env.AdminToken)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("watch: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		_ = resp.Body.Close()
		return nil, fmt.Errorf("watch: %s", resp.Status)
	}
	w := &watchStream{seen: map[string]time.Time{}, done: make(chan struct{}), tr: tr}
	go func() {
		defer close(w.done)
		defer func() { _ = resp.Body.Close() }()
		dec := json.NewDecoder(resp.Body)
		for {
			var ev struct {
				Type   string `json:"type"`
				Object struct {
					Metadata struct {
						Name string `json:"name"`
					} `json:"metadata"`
				} `json:"object"`
			}
			err := dec.Decode(&ev)
			w.mu.Lock()
			if err != nil {
				w.ended = time.Now()
				if !errors.Is(err, io.EOF) {
					w.err = err
				}
				w.mu.Unlock()
				return
			}
			if _, ok := w.seen[ev.Object.Metadata.Name]; !ok && ev.Type != "BOOKMARK" {
				w.seen[ev.Object.Metadata.Name] = time.Now()
			}
			w.mu.Unlock()
		}
	}()
	return w, nil
}

// state returns when the watch ended (zero while open), how, and whether it
// has shown name.
func (w *watchStream) state(name string) (ended time.Time, err error, saw bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	_, saw = w.seen[name]
	return w.ended, w.err, saw
}

// close ends the watch from the client side.
func (w *watchStream) close() {
	w.tr.CloseIdleConnections()
}

// resourceVersion lists the default namespace's configmaps through
// extractedprism and returns the list's resourceVersion.
func resourceVersion(t *testing.T) string {
	t.Helper()
	out := env.MustKubectl(t, proxyAddr, "", "get", "--raw", "/api/v1/namespaces/default/configmaps?limit=1")
	var l struct {
		Metadata struct {
			ResourceVersion string `json:"resourceVersion"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal([]byte(out), &l); err != nil || l.Metadata.ResourceVersion == "" {
		t.Fatalf("list resourceVersion from %q: %v", out, err)
	}
	return l.Metadata.ResourceVersion
}

// etcdAway is how long etcd is stopped.
const etcdAway = 20 * time.Second

// testEtcdOutage takes etcd away for 20 s while 10 watches run through
// extractedprism: SIGSTOP (etcd hangs, the apiservers' /readyz hangs on
// it) or SIGKILL and a restart on the same data (etcd refuses, /readyz
// answers 500 at once). Every apiserver turns unready and keeps serving its
// watches from its cache; there is no better upstream to move them to, so
// extractedprism must not cut them, and kubectl must work again within 5 s
// of etcd's return.
func testEtcdOutage(t *testing.T, d *daemon, as []*apiserver, how syscall.Signal) {
	what := map[syscall.Signal]string{syscall.SIGSTOP: "SIGSTOP", syscall.SIGKILL: "SIGKILL and restart"}[how]
	const n = 10
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rv := resourceVersion(t)
	watches := make([]*watchStream, n)
	for i := range n {
		w, err := openWatch(ctx, rv)
		if err != nil {
			t.Fatalf("watch %d: %v", i, err)
		}
		watches[i] = w
	}
	defer func() {
		cancel()
		for _, w := range watches {
			w.close()
			<-w.done
		}
	}()
	waitWatches := func(name string, timeout time.Duration) (saw int) {
		deadline := time.Now().Add(timeout)
		for {
			saw = 0
			open := 0
			for _, w := range watches {
				ended, _, s := w.state(name)
				if s {
					saw++
				} else if ended.IsZero() {
					open++
				}
			}
			if open == 0 || time.Now().After(deadline) {
				return saw
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	tag := strings.ToLower(strings.Fields(what)[0])
	env.MustKubectl(t, proxyAddr, "", "create", "configmap", tag+"-before", "-n", "default", "--from-literal=k=v")
	if saw := waitWatches(tag+"-before", time.Minute); saw != n {
		t.Fatalf("only %d of %d watches through extractedprism showed a new configmap before the outage", saw, n)
	}

	cut0 := closedOnDown(t)
	m := monitorHealth(t, d)
	stopped := time.Now()
	env.Etcd.Signal(how)
	resumed := false
	resume := func() {
		if resumed {
			return
		}
		resumed = true
		if how == syscall.SIGSTOP {
			env.Etcd.Signal(syscall.SIGCONT)
			return
		}
		if err := env.Etcd.Wait(time.Minute); err == nil {
			t.Errorf("etcd exited cleanly on SIGKILL")
		}
		if err := env.StartEtcd(); err != nil {
			t.Fatalf("restart etcd: %v", err)
		}
	}
	defer resume()
	for time.Since(stopped) < etcdAway {
		if !d.p.Running() {
			t.Fatalf("extractedprism exited during the etcd outage: %v\n%s", d.p.Err, d.p.Tail(30))
		}
		time.Sleep(100 * time.Millisecond)
	}
	cutAway := closedOnDown(t) - cut0
	resume()
	back := time.Now()
	// The apiservers themselves may take a while to reach etcd again (a
	// killed etcd: their client's reconnect backoff): when does the first
	// one answer a LIST directly, not through extractedprism?
	direct, stopDirect := firstDirectAnswer(ctx, as)
	defer stopDirect()

	// kubectl through extractedprism as soon as etcd is back.
	var worked time.Time
	attempts := 0
	var lastErr error
	for worked.IsZero() {
		attempts++
		kctx, kcancel := context.WithTimeout(context.Background(), 20*time.Second)
		_, err := env.Kubectl(kctx, proxyAddr, "", "get", "configmaps", "-n", "default", "-o", "name")
		kcancel()
		if err == nil {
			worked = time.Now()
			break
		}
		lastErr = err
		if time.Since(back) > 2*time.Minute {
			t.Fatalf("kubectl through extractedprism still fails 2 minutes after etcd's return: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var apiBack time.Time
	select {
	case apiBack = <-direct:
	case <-time.After(2 * time.Minute):
		t.Fatalf("no apiserver answered a LIST directly within 2 minutes of etcd's return")
	}
	_, allBack := d.waitStatus(t, "every upstream up again", 2*time.Minute, func(doc status.Document) bool {
		return doc.Ready && allUp(doc, len(as))
	})
	env.MustKubectl(t, proxyAddr, "", "create", "configmap", tag+"-after", "-n", "default", "--from-literal=k=v")
	sawAfter := waitWatches(tag+"-after", time.Minute)
	settled := time.Now()
	m.stop()
	cutAll := closedOnDown(t) - cut0

	var cutWhileAway, cutAfter, cleanEnds int
	var firstCut time.Duration = -1
	var errs []string
	for _, w := range watches {
		ended, err, _ := w.state("")
		switch {
		case ended.IsZero():
		case err == nil:
			cleanEnds++
		default:
			if ended.Before(back) {
				cutWhileAway++
			} else {
				cutAfter++
			}
			if at := ended.Sub(stopped); firstCut < 0 || at < firstCut {
				firstCut = at
			}
			if len(errs) < 3 {
				errs = append(errs, fmt.Sprintf("+%.1f s: %v", ended.Sub(stopped).Seconds(), err))
			}
		}
	}
	h := m.summary(stopped, back)
	first := ""
	if firstCut >= 0 {
		first = fmt.Sprintf(" (first %.1f s in)", firstCut.Seconds())
	}
	var downs []string
	for addr, at := range h.firstNotUp {
		downs = append(downs, fmt.Sprintf("%s %.1f s in", addr, at.Sub(stopped).Seconds()))
	}
	slices.Sort(downs)
	env.Record("etcd outage (%s, %s, %d watches): watches cut while etcd was away %d%s, cut after its return %d, ended cleanly by an apiserver %d; closed_on_down +%v while away, +%v in all; /readyz 200 in %.1f %% of the outage; upstreams not up: %v",
		what, etcdAway, n, cutWhileAway, first, cutAfter, cleanEnds, cutAway, cutAll, 100*h.availability(), downs)
	env.Record("etcd outage (%s): etcd back -> kubectl get through extractedprism works %s (%d attempts; an apiserver answered directly after %s); -> every upstream up %s; %d of %d watches showed a configmap created afterwards",
		what, worked.Sub(back).Round(time.Millisecond), attempts, apiBack.Sub(back).Round(time.Millisecond),
		allBack.Sub(back).Round(time.Millisecond), sawAfter, n)
	t.Logf("etcd outage: watch ends %v; last kubectl error before it worked: %v; settled %s after etcd's return",
		errs, lastErr, settled.Sub(back).Round(time.Millisecond))
	if cutWhileAway > 0 || cutAway > 0 {
		t.Errorf("extractedprism cut %d of %d watches while etcd was away (closed_on_down +%v); first cut %.1f s in: %v",
			cutWhileAway, n, cutAway, firstCut.Seconds(), errs)
	}
	// Within 5 s of etcd's return, or of the first apiserver's, when the
	// apiservers themselves took longer: no balancer can answer earlier.
	from := back
	if apiBack.After(from) {
		from = apiBack
	}
	if took := worked.Sub(from); took > 5*time.Second {
		t.Errorf("kubectl through extractedprism worked only %s after etcd's return (%s after an apiserver answered directly), want within 5 s",
			worked.Sub(back).Round(time.Millisecond), took.Round(time.Millisecond))
	}
}

// firstDirectAnswer sends, once, the time the first of the apiservers
// answered a LIST of configmaps directly with 200, asking each every 100 ms
// until then or until stopped.
func firstDirectAnswer(ctx context.Context, as []*apiserver) (<-chan time.Time, context.CancelFunc) {
	out := make(chan time.Time, 1)
	ctx, cancel := context.WithCancel(ctx)
	var once sync.Once
	for _, a := range as {
		go func() {
			c := apiClient(2*time.Second, false)
			for ctx.Err() == nil {
				code, _, err := apiRequest(ctx, c, http.MethodGet, a.Addr(), "/api/v1/namespaces/default/configmaps?limit=1", nil)
				if err == nil && code == http.StatusOK {
					once.Do(func() {
						out <- time.Now()
						cancel()
					})
					return
				}
				select {
				case <-ctx.Done():
				case <-time.After(100 * time.Millisecond):
				}
			}
		}()
	}
	return out, cancel
}

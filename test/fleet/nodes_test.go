package fleet

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/readiness"
	"github.com/extractedprism/extractedprism/pkg/status"
	"github.com/extractedprism/extractedprism/test/cluster"
)

// node is one simulated node: an extractedprism on its own loopback
// address, as it runs on every node of a cluster.
type node struct {
	ip string
	p  *proc
}

// proxyAddr is the node's local API server endpoint.
func (n *node) proxyAddr() string { return net.JoinHostPort(n.ip, "7445") }

// status fetches the node's /status.
func (n *node) status(c *http.Client) (status.Document, error) {
	return cluster.GetStatus(c, net.JoinHostPort(n.ip, "7446"))
}

// fleet is N nodes and their client streams.
type fleet struct {
	nodes   []*node
	spawned time.Duration // from the first node's start to the last one's
	admin   *http.Client
	streams *streams
}

// nodeConfig is a node's configuration file: static endpoints, discovery
// through its own listener with the restricted credentials, the shared
// readiness verdicts, and the given close_spread.
func nodeConfig(ip string, endpoints []string, kubeconfig, spread string) string {
	return fmt.Sprintf(`listen: {address: %s, port: 7445, reuse_port: false}
admin: {address: %s, port: 7446}
endpoints: [%s]
probe: {ca_file: %s, shared_readiness: {namespace: %s, name: %s}}
proxy: {close_spread: %s, drain_timeout: 1s}
discovery: {enabled: true, kubeconfig: %s, state_file: ""}
log: {level: info}
`, ip, ip, strings.Join(endpoints, ", "), env.CA.File, readinessNS, readiness.DefaultConfigMap, spread, kubeconfig)
}

// startFleet starts n nodes with static endpoints eps and close_spread
// spread, and waits until every node has every endpoint up.
func startFleet(t *testing.T, n int, eps []string, spread string) *fleet {
	t.Helper()
	kc, err := env.TokenKubeconfig("discovery", "https://"+eps[0], env.discToken)
	if err != nil {
		t.Fatal(err)
	}
	f := &fleet{admin: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1}}}
	dir := t.TempDir()
	first := time.Now()
	for i := range n {
		ip := fmt.Sprintf("127.0.1.%d", i+1)
		if i >= 250 {
			ip = fmt.Sprintf("127.0.2.%d", i-249)
		}
		cfg := filepath.Join(dir, ip+".yaml")
		if err := os.WriteFile(cfg, []byte(nodeConfig(ip, eps, kc, spread)), 0o600); err != nil {
			t.Fatal(err)
		}
		p, err := env.Start("node-"+ip, env.daemon, "--config="+cfg)
		if err != nil {
			t.Fatal(err)
		}
		f.nodes = append(f.nodes, &node{ip: ip, p: p})
	}
	f.spawned = time.Since(first)
	t.Cleanup(func() { f.stop(t) })
	f.waitAll(t, "every static endpoint up", 3*time.Minute, func(d status.Document) bool {
		for _, e := range eps {
			if u, ok := upstream(d, e); !ok || u.State != "up" {
				return false
			}
		}
		return true
	})
	return f
}

// stop ends the streams and the nodes (SIGTERM by PID, then SIGKILL).
func (f *fleet) stop(t *testing.T) {
	if f.streams != nil {
		f.streams.stop()
	}
	for _, n := range f.nodes {
		n.p.Signal(syscall.SIGTERM)
	}
	for _, n := range f.nodes {
		if err := n.p.Wait(30 * time.Second); err != nil && n.p.Running() {
			t.Logf("%s: %v", n.p.Name, err)
			n.p.Kill()
		}
		if t.Failed() && n == f.nodes[0] {
			t.Logf("last lines of %s:\n%s", n.p.Name, n.p.Tail(30))
		}
	}
	f.admin.CloseIdleConnections()
}

// waitAll polls every node's /status until cond holds on each, and returns
// for each node the time it first held.
func (f *fleet) waitAll(t *testing.T, what string, timeout time.Duration, cond func(status.Document) bool) []time.Time {
	t.Helper()
	at := make([]time.Time, len(f.nodes))
	errs := make([]string, len(f.nodes))
	deadline := time.Now().Add(timeout)
	var wg sync.WaitGroup
	for i, n := range f.nodes {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				doc, err := n.status(f.admin)
				if err == nil && cond(doc) {
					at[i] = time.Now()
					return
				}
				if err != nil {
					errs[i] = err.Error()
				} else {
					errs[i] = describe(doc)
				}
				if !n.p.Running() {
					errs[i] = fmt.Sprintf("exited: %v\n%s", n.p.Err, n.p.Tail(20))
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
	wg.Wait()
	for i, a := range at {
		if a.IsZero() {
			t.Fatalf("node %s: not %s within %s; last: %s", f.nodes[i].ip, what, timeout, errs[i])
		}
	}
	return at
}

// activeOn sums the client connections the nodes report on upstream addr.
func (f *fleet) activeOn(addr string) (int64, error) {
	var sum int64
	for _, n := range f.nodes {
		doc, err := n.status(f.admin)
		if err != nil {
			return 0, fmt.Errorf("node %s: %w", n.ip, err)
		}
		if u, ok := upstream(doc, addr); ok {
			sum += u.ActiveConnections
		}
	}
	return sum, nil
}

// describe renders the upstreams as "addr(source,state,conns)".
func describe(doc status.Document) string {
	parts := make([]string, 0, len(doc.Upstreams))
	for _, u := range doc.Upstreams {
		parts = append(parts, fmt.Sprintf("%s(%s,%s,%d)", u.Address, u.Source, u.State, u.ActiveConnections))
	}
	return strings.Join(parts, " ")
}

// streams are long-lived client streams through the nodes: each is a watch
// of configmaps on a connection of its own (as kubelet's, kube-proxy's and
// the CNI's connections are), reconnected at once when it ends, as a
// reflector restarts its watch.
type streams struct {
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	open      atomic.Int64 // streams whose watch is running
	connects  atomic.Int64 // watches started, reconnects included
	failures  atomic.Int64 // attempts that got no watch
	lastErr   atomic.Pointer[string]
	transport []*http.Transport
}

// startStreams opens per streams per node and waits until all run.
func (f *fleet) startStreams(t *testing.T, per int) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &streams{cancel: cancel}
	f.streams = s
	for _, n := range f.nodes {
		for range per {
			tr := &http.Transport{
				TLSClientConfig: &tls.Config{RootCAs: env.CA.Pool, ServerName: "kubernetes", MinVersion: tls.VersionTLS12},
				MaxConnsPerHost: 1,
				// A watch answers its headers at once; a stream that gets
				// none is retried like a failed one.
				ResponseHeaderTimeout: 20 * time.Second,
				TLSHandshakeTimeout:   10 * time.Second,
			}
			s.transport = append(s.transport, tr)
			s.wg.Go(func() { s.run(ctx, tr, n.proxyAddr()) })
		}
	}
	want := int64(len(f.nodes) * per)
	deadline := time.Now().Add(2 * time.Minute)
	for s.open.Load() < want {
		if time.Now().After(deadline) {
			last := "none"
			if e := s.lastErr.Load(); e != nil {
				last = *e
			}
			t.Fatalf("%d of %d client streams running after 2 minutes (%d failed attempts, last error: %s)", s.open.Load(), want, s.failures.Load(), last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// run keeps one watch going until ctx is done, as a reflector does: list
// once for a resourceVersion, watch from it, and after the watch ends watch
// again from the last version seen (list again only when that is too old).
// List and watch share the stream's one connection while it lasts.
func (s *streams) run(ctx context.Context, tr *http.Transport, addr string) {
	client := &http.Client{Transport: tr}
	base := "https://" + addr + "/api/v1/namespaces/default/configmaps"
	rv := ""
	fail := func(msg string) {
		s.failures.Add(1)
		s.lastErr.Store(&msg)
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond): // a client's retry back-off
		}
	}
	for ctx.Err() == nil {
		if rv == "" {
			var err error
			if rv, err = list(ctx, client, base); err != nil {
				fail(err.Error())
				continue
			}
		}
		resp, err := get(ctx, client, base+"?watch=1&allowWatchBookmarks=true&timeoutSeconds=3600&resourceVersion="+rv)
		if err != nil {
			fail(err.Error())
			continue
		}
		s.connects.Add(1)
		s.open.Add(1)
		began := time.Now()
		events, last, gone, derr := decodeWatch(resp.Body)
		_ = resp.Body.Close()
		s.open.Add(-1)
		if last != "" {
			rv = last
		}
		if gone {
			rv = ""
		}
		if ctx.Err() == nil && events == 0 && time.Since(began) < time.Second {
			fail(fmt.Sprintf("watch ended after %s: %v", time.Since(began).Round(time.Millisecond), derr))
		}
	}
}

// get sends an authenticated GET and returns a 200 response.
func get(ctx context.Context, client *http.Client, url string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+env.AdminToken)
	req.Header.Set("User-Agent", "fleet-stream")
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		_ = resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return resp, nil
}

// list returns the collection's resourceVersion.
func list(ctx context.Context, client *http.Client, url string) (string, error) {
	resp, err := get(ctx, client, url)
	if err != nil {
		return "", err
	}
	defer func() { _ = resp.Body.Close() }()
	var l struct {
		Metadata struct {
			ResourceVersion string `json:"resourceVersion"`
		} `json:"metadata"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&l); err != nil {
		return "", fmt.Errorf("decode list: %w", err)
	}
	if l.Metadata.ResourceVersion == "" {
		return "", fmt.Errorf("list %s: no resourceVersion", url)
	}
	return l.Metadata.ResourceVersion, nil
}

// decodeWatch reads watch events until the stream ends; it returns how many
// arrived, the last resourceVersion seen, and whether the apiserver said
// the version is too old (410 Gone).
func decodeWatch(r io.Reader) (events int, last string, gone bool, err error) {
	dec := json.NewDecoder(r)
	for {
		var ev struct {
			Type   string `json:"type"`
			Object struct {
				Code     int `json:"code"`
				Metadata struct {
					ResourceVersion string `json:"resourceVersion"`
				} `json:"metadata"`
			} `json:"object"`
		}
		if err := dec.Decode(&ev); err != nil {
			return events, last, gone, err
		}
		events++
		if ev.Type == "ERROR" {
			gone = gone || ev.Object.Code == http.StatusGone
			continue
		}
		if v := ev.Object.Metadata.ResourceVersion; v != "" {
			last = v
		}
	}
}

func (s *streams) stop() {
	s.cancel()
	s.wg.Wait()
	for _, tr := range s.transport {
		tr.CloseIdleConnections()
	}
}

// probeCount sums the probes every node has sent to every upstream so far
// (extractedprism_upstream_probe_duration_seconds_count).
func (f *fleet) probeCount() (float64, error) {
	var sum float64
	for _, n := range f.nodes {
		resp, err := f.admin.Get("http://" + net.JoinHostPort(n.ip, "7446") + "/metrics")
		if err != nil {
			return 0, fmt.Errorf("node %s: GET /metrics: %w", n.ip, err)
		}
		b, err := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if err != nil {
			return 0, fmt.Errorf("node %s: read /metrics: %w", n.ip, err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if !strings.HasPrefix(line, "extractedprism_upstream_probe_duration_seconds_count{") {
				continue
			}
			var v float64
			if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err != nil {
				return 0, fmt.Errorf("node %s: %q: %w", n.ip, line, err)
			}
			sum += v
		}
	}
	return sum, nil
}

// startTicker updates one configmap every period through apiserver a, so
// that every client stream receives an event each time (the steady trickle
// of events a large cluster's watches see). It stops at test end.
func startTicker(t *testing.T, a *apiserver, period time.Duration) {
	t.Helper()
	client := env.HTTPSClient()
	client.Transport.(*http.Transport).DisableKeepAlives = false
	url := "https://" + a.Addr() + "/api/v1/namespaces/default/configmaps"
	send := func(method, u string, n int) error {
		body := fmt.Sprintf(`{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"fleet-tick"},"data":{"n":"%d"}}`, n)
		req, err := http.NewRequest(method, u, strings.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+env.AdminToken)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode >= 300 && resp.StatusCode != http.StatusConflict {
			return fmt.Errorf("%s %s: %s", method, u, resp.Status)
		}
		return nil
	}
	if err := send(http.MethodPost, url, 0); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(period)
		defer tick.Stop()
		for n := 1; ; n++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			_ = send(http.MethodPut, url+"/fleet-tick", n) // a missed tick only thins the trickle
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		client.CloseIdleConnections()
	})
}

package fleet

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/extractedprism/extractedprism/internal/standin"
	"github.com/extractedprism/extractedprism/pkg/readiness"
	"github.com/extractedprism/extractedprism/pkg/status"
)

// readinessNS is the namespace of the publisher's ConfigMap and Lease.
const readinessNS = "ep-readiness"

// readinessRBAC is what the chart grants (manifests/helm/extractedprism,
// templates/readiness-rbac.yaml), bound to the test's static users: the
// publisher may get and update its ConfigMap and Lease by name (and create
// them), and get the kubernetes EndpointSlice; a node may only get, list
// and watch the ConfigMap by name.
const readinessRBAC = `apiVersion: v1
kind: Namespace
metadata: {name: ep-readiness}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: readiness-publisher, namespace: ep-readiness}
rules:
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [extractedprism-readiness]
  verbs: [get, update]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  resourceNames: [extractedprism-readiness-publisher]
  verbs: [get, update]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: readiness-publisher, namespace: ep-readiness}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: readiness-publisher}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: extractedprism-readiness-publisher}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: extractedprism-readiness-endpointslice}
rules:
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  resourceNames: [kubernetes]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: extractedprism-readiness-endpointslice, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: extractedprism-readiness-endpointslice}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: extractedprism-readiness-publisher}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: readiness-reader, namespace: ep-readiness}
rules:
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [extractedprism-readiness]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: readiness-reader, namespace: ep-readiness}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: readiness-reader}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: extractedprism-node}
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: extractedprism-discovery}
`

// readinessRig is one apiserver, the publishers' credentials and the
// stand-in apiservers they probe as static endpoints.
type readinessRig struct {
	a        *apiserver
	standins []*standin.Server
	pubKC    string // the publisher's kubeconfig (its CA file trusts the stand-ins too)
	bundle   string // the cluster CA and the stand-ins' certificate
	admin    kubernetes.Interface
}

// newReadinessRig starts an apiserver on ip with the readiness RBAC, and
// n stand-ins.
func newReadinessRig(t *testing.T, ip string, standins int) *readinessRig {
	t.Helper()
	r := &readinessRig{a: env.startAPIServer(t, ip, "")}
	env.WaitReady(t, r.a)
	env.MustKubectl(t, r.a.Addr(), readinessRBAC, "apply", "-f", "-")
	cert, certPEM, err := standin.GenerateCertificate()
	if err != nil {
		t.Fatal(err)
	}
	for i := range standins {
		s, err := standin.Start(context.Background(), standin.Options{Name: fmt.Sprintf("standin-%d", i), Certificate: &cert})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		r.standins = append(r.standins, s)
	}
	ca, err := os.ReadFile(env.CA.File)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bundle := filepath.Join(dir, "ca-and-standins.crt")
	if err := os.WriteFile(bundle, append(ca, certPEM...), 0o600); err != nil {
		t.Fatal(err)
	}
	shared, err := env.TokenKubeconfig("readiness-publisher", "https://"+r.a.Addr(), env.pubToken)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(shared)
	if err != nil {
		t.Fatal(err)
	}
	// A copy of this test's own: the environment's kubeconfigs are
	// shared by every test and never change once written.
	kc := filepath.Join(dir, "readiness-publisher.kubeconfig")
	if err := os.WriteFile(kc, []byte(strings.ReplaceAll(string(b), env.CA.File, bundle)), 0o600); err != nil {
		t.Fatal(err)
	}
	r.pubKC, r.bundle = kc, bundle
	r.admin = r.client(t, env.AdminToken)
	return r
}

// client returns a clientset for token with a connection of its own (a
// dial function of its own keeps client-go from sharing transports).
func (r *readinessRig) client(t *testing.T, token string) kubernetes.Interface {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second}
	cfg := &rest.Config{
		Host: "https://" + r.a.Addr(), BearerToken: token,
		TLSClientConfig: rest.TLSClientConfig{CAFile: env.CA.File},
		Dial:            d.DialContext, QPS: -1,
	}
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (r *readinessRig) standinAddrs() []string {
	var out []string
	for _, s := range r.standins {
		out = append(out, s.Addr())
	}
	return out
}

// startPublisher runs `extractedprism readiness-publisher` as its own
// process with the publisher's restricted credentials.
func (r *readinessRig) startPublisher(t *testing.T, id string, extra ...string) *proc {
	t.Helper()
	args := append([]string{"readiness-publisher", "--kubeconfig=" + r.pubKC, "--namespace=" + readinessNS,
		"--identity=" + id, "--admin-address=", "--endpoints=" + strings.Join(r.standinAddrs(), ",")}, extra...)
	p, err := env.Start(id, env.daemon, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.Running() {
			p.Kill()
		}
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", p.Name, p.Tail(15))
		}
	})
	return p
}

// document reads the published document (ok false when there is none).
func (r *readinessRig) document(t *testing.T) (readiness.Document, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cm, err := r.admin.CoreV1().ConfigMaps(readinessNS).Get(ctx, readiness.DefaultConfigMap, metav1.GetOptions{})
	if err != nil {
		return readiness.Document{}, false
	}
	d, err := readiness.Decode([]byte(cm.Data[readiness.DataKey]))
	if err != nil {
		t.Fatalf("published ConfigMap does not decode: %v", err)
	}
	return d, true
}

// watchers are simulated nodes' Watchers, each on its own connection with
// the node's restricted credentials.
type watchers struct {
	ws     []*readiness.Watcher
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func (r *readinessRig) startWatchers(t *testing.T, n int, staleAfter time.Duration) *watchers {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &watchers{cancel: cancel}
	log := slog.New(slog.DiscardHandler)
	if n <= 5 {
		log = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	}
	for range n {
		wt := readiness.NewWatcher(readiness.WatcherOptions{
			Client: r.client(t, env.nodeToken), Namespace: readinessNS, Name: readiness.DefaultConfigMap,
			StaleAfter: staleAfter, Logger: log,
		})
		w.ws = append(w.ws, wt)
		w.wg.Go(func() { _ = wt.Run(ctx) })
	}
	t.Cleanup(w.stop)
	return w
}

func (w *watchers) stop() {
	w.cancel()
	w.wg.Wait()
}

// all reports whether cond holds for Lookup(addr) on every Watcher.
func (w *watchers) all(addr string, cond func(readiness.Verdict, bool) bool) bool {
	for _, wt := range w.ws {
		if !cond(wt.Lookup(addr)) {
			return false
		}
	}
	return true
}

// waitAll polls until cond holds on every Watcher and returns when it did.
func (w *watchers) waitAll(t *testing.T, what, addr string, timeout time.Duration, cond func(readiness.Verdict, bool) bool) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !w.all(addr, cond) {
		if time.Now().After(deadline) {
			v, ok := w.ws[0].Lookup(addr)
			t.Fatalf("%s: not on every node within %s (first node: %+v fresh=%t)", what, timeout, v, ok)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Now()
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func isReady(v readiness.Verdict, fresh bool) bool   { return fresh && v.Ready }
func isUnready(v readiness.Verdict, fresh bool) bool { return fresh && !v.Ready && v.Code == 500 }
func notFresh(_ readiness.Verdict, fresh bool) bool  { return !fresh }

// TestSharedReadiness runs two publishers (the binary, with the chart's
// RBAC) against a real apiserver and stand-in apiservers, and Watchers as
// the nodes: an apiserver that turns unready is seen by every node within
// 2 s, the second publisher takes over when the leader is killed, and the
// nodes stop trusting the verdicts once no publisher is left.
func TestSharedReadiness(t *testing.T) {
	r := newReadinessRig(t, apiserverIPs[0], 3)
	lease := []string{"--heartbeat=2s", "--lease-duration=4s", "--renew-deadline=3s", "--retry-period=500ms"}
	pubs := map[string]*proc{
		"publisher-a": r.startPublisher(t, "publisher-a", lease...),
		"publisher-b": r.startPublisher(t, "publisher-b", lease...),
	}
	const staleAfter = 6 * time.Second
	w := r.startWatchers(t, 5, staleAfter)
	target := r.standins[1].Addr()

	// The first document a node lists is not trusted (its publisher may be
	// gone); the next heartbeat is.
	w.waitAll(t, "stand-ins ready", r.standins[0].Addr(), 30*time.Second, isReady)
	w.waitAll(t, "the real apiserver (from its EndpointSlice) ready", r.a.Addr(), 10*time.Second, isReady)
	d, _ := r.document(t)
	t.Logf("published by %s, sequence %d: %v", d.Publisher, d.Sequence, d.APIServers)

	nodes := r.startNodes(t, 3, staleAfter)

	// An explicit 500 on one stand-in's /readyz reaches every node.
	r.standins[1].SetReady(false)
	turned := time.Now()
	seen := w.waitAll(t, "the unready stand-in", target, 10*time.Second, isUnready)
	lag := seen.Sub(turned)
	env.Record("shared readiness: a stand-in's /readyz turned 500; every one of %d Watchers saw it %.2f s later (interval 1 s)", len(w.ws), lag.Seconds())
	if lag > 2*time.Second {
		t.Errorf("the unready apiserver reached every node %s after it turned unready; want within 2 s", lag)
	}
	// And every balancer took it out of rotation (polled from here on, so
	// an upper bound).
	at := nodes.waitAll(t, "the unready stand-in down", 30*time.Second, func(d status.Document) bool {
		u, ok := upstream(d, target)
		return ok && u.State == "down"
	})
	out := slices.MaxFunc(at, func(a, b time.Time) int { return a.Compare(b) }).Sub(turned)
	env.Record("shared readiness: every one of %d balancers took the unready stand-in out of rotation %.2f s after it turned unready (no /readyz GET of their own)", len(nodes.nodes), out.Seconds())
	setResult(&fleetResult.unreadyOut, out.Seconds())
	if out > 4*time.Second+3*time.Second {
		t.Errorf("the unready apiserver left rotation on every node %s after it turned unready; want within 4 s (+3 s slack)", out)
	}
	if v, _ := w.ws[0].Lookup(target); !strings.Contains(v.Reason, "standin-ready failed") {
		t.Errorf("reason %q, want the failing check", v.Reason)
	}
	r.standins[1].SetReady(true)
	w.waitAll(t, "the stand-in ready again", target, 10*time.Second, isReady)

	// Kill the leader: the other replica takes over.
	d, _ = r.document(t)
	leader := d.Publisher
	other := "publisher-a"
	if leader == other {
		other = "publisher-b"
	}
	pubs[leader].Signal(syscall.SIGKILL)
	killed := time.Now()
	deadline := killed.Add(20 * time.Second)
	for {
		n, ok := r.document(t)
		if ok && n.Publisher == other && n.Sequence > d.Sequence {
			env.Record("shared readiness: leader %s killed (lease 4 s, retry 0.5 s); %s published %.1f s later, sequence %d -> %d",
				leader, other, time.Since(killed).Seconds(), d.Sequence, n.Sequence)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not take over within 20 s of killing %s (document %+v)", other, leader, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.standins[2].SetReady(false)
	w.waitAll(t, "an unready stand-in, published by the new leader", r.standins[2].Addr(), 10*time.Second, isUnready)

	// No publisher left: after StaleAfter without an update, no node
	// trusts a verdict.
	pubs[other].Signal(syscall.SIGKILL)
	killed = time.Now()
	stale := w.waitAll(t, "no fresh verdict", r.standins[2].Addr(), staleAfter+10*time.Second, notFresh)
	env.Record("shared readiness: last publisher killed; every Watcher reported no fresh verdict %.1f s later (StaleAfter %s, heartbeat 2 s)",
		stale.Sub(killed).Seconds(), staleAfter)
	if stale.Sub(killed) > staleAfter+2*time.Second {
		t.Errorf("verdicts still trusted %s after the last publisher died (StaleAfter %s)", stale.Sub(killed), staleAfter)
	}
	// And a node never gets an address from the shared verdicts.
	if _, ok := w.ws[0].Lookup("198.51.100.99:6443"); ok {
		t.Error("a verdict for an address nobody published")
	}
}

// startNodes runs n balancers in front of the stand-ins that read the
// shared verdicts with the node's restricted credentials (no discovery),
// and waits until each has every stand-in up on the shared verdicts.
func (r *readinessRig) startNodes(t *testing.T, n int, staleAfter time.Duration) *fleet {
	t.Helper()
	kc, err := env.TokenKubeconfig("node", "https://"+r.a.Addr(), env.nodeToken)
	if err != nil {
		t.Fatal(err)
	}
	f := &fleet{admin: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1}}}
	dir := t.TempDir()
	for i := range n {
		ip := fmt.Sprintf("127.0.3.%d", i+1)
		cfg := fmt.Sprintf(`listen: {address: %s, port: 7445, reuse_port: false}
admin: {address: %s, port: 7446}
endpoints: [%s]
probe: {ca_file: %s, shared_readiness: {namespace: %s, name: %s, stale_after: %s}}
discovery: {enabled: false, via_local: false, kubeconfig: %s, state_file: ""}
`, ip, ip, strings.Join(r.standinAddrs(), ", "), r.bundle, readinessNS, readiness.DefaultConfigMap, staleAfter, kc)
		file := filepath.Join(dir, ip+".yaml")
		if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		p, err := env.Start("node-"+ip, env.daemon, "--config="+file)
		if err != nil {
			t.Fatal(err)
		}
		f.nodes = append(f.nodes, &node{ip: ip, p: p})
	}
	t.Cleanup(func() { f.stop(t) })
	f.waitAll(t, "every stand-in up on the shared verdicts", 2*time.Minute, func(d status.Document) bool {
		for _, a := range r.standinAddrs() {
			if u, ok := upstream(d, a); !ok || u.State != "up" || !u.ReadinessShared {
				return false
			}
		}
		return true
	})
	return f
}

// writeLoad rewrites the ConfigMap rate times a second with a valid
// document until ctx is done, as a publisher's heartbeat does, and returns
// the number of writes.
func (r *readinessRig) writeLoad(ctx context.Context, t *testing.T, rate int) int {
	t.Helper()
	cms := r.admin.CoreV1().ConfigMaps(readinessNS)
	cm, err := cms.Get(ctx, readiness.DefaultConfigMap, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	writes := 0
	for seq := uint64(1 << 20); ; seq++ {
		select {
		case <-ctx.Done():
			return writes
		case <-tick.C:
		}
		b, err := readiness.Encode(readiness.Document{
			Format: readiness.FormatVersion, Publisher: "load", Sequence: seq, Interval: time.Second,
			Heartbeat: 10 * time.Second, Published: time.Now(),
			APIServers: map[string]readiness.Entry{r.a.Addr(): {Ready: true, Code: 200, Since: time.Now()}},
		})
		if err != nil {
			t.Fatal(err)
		}
		cm.Data[readiness.DataKey] = string(b)
		next, err := cms.Update(ctx, cm, metav1.UpdateOptions{})
		if err != nil {
			if ctx.Err() != nil {
				return writes
			}
			t.Fatalf("write load: %v", err)
		}
		cm = next
		writes++
	}
}

// window measures the apiserver's CPU cores and RSS over the probe window,
// optionally while load runs.
func (r *readinessRig) window(t *testing.T, p params, load func(ctx context.Context) int) (cores float64, rss int64, loaded int) {
	t.Helper()
	pid := r.a.P.Cmd.Process.Pid
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	if load != nil {
		go func() { done <- load(ctx) }()
	}
	m, err := startCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(p.ProbeWindow) // a measurement window, not synchronisation
	used, wall, err := m.stop()
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if load != nil {
		loaded = <-done
	}
	if rss, err = rssBytes(pid); err != nil {
		t.Fatal(err)
	}
	return used[0] / wall.Seconds(), rss, loaded
}

// TestSharedReadinessCost measures what the shared readiness costs a real
// apiserver: the publishers (probes, Lease, EndpointSlice reads, the
// heartbeat writes), N nodes' watches of the ConfigMap at rest, and each
// event fanned out to a watch; and scales them to 5,000 nodes.
func TestSharedReadinessCost(t *testing.T) {
	p := loadParams(t)
	r := newReadinessRig(t, apiserverIPs[0], 0)
	settle(t, r.a.P.Cmd.Process.Pid, 90*time.Second)

	// Two idle windows: their mean is the baseline, their difference the
	// noise. (After the write load the apiserver stays busier for minutes,
	// so no baseline is taken at the end.)
	base1, _, _ := r.window(t, p, nil)
	base2, rss0, _ := r.window(t, p, nil)
	pubs := []*proc{r.startPublisher(t, "publisher-a"), r.startPublisher(t, "publisher-b")}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if d, ok := r.document(t); ok && strings.HasPrefix(d.Publisher, "publisher-") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no publisher published within 30 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	withPub, _, _ := r.window(t, p, nil)

	w := r.startWatchers(t, p.Watchers, 0)
	w.waitAll(t, "fresh verdicts", r.a.Addr(), 30*time.Second, isReady)
	withWatch, rss1, _ := r.window(t, p, nil)

	for _, pp := range pubs {
		pp.Signal(syscall.SIGTERM)
		if err := pp.Wait(10 * time.Second); err != nil {
			t.Errorf("%s: %v", pp.Name, err)
		}
	}
	watchIdle, _, _ := r.window(t, p, nil)
	const rate = 10
	load := func(ctx context.Context) int { return r.writeLoad(ctx, t, rate) }
	watchLoad, _, writes := r.window(t, p, load)
	w.stop()
	waitLoad, _, writesAlone := r.window(t, p, load)

	n := float64(p.Watchers)
	win := p.ProbeWindow.Seconds()
	idle := (base1 + base2) / 2
	pubCores := withPub - idle
	idlePerWatch := (watchIdle - idle) / n
	writeCost := (waitLoad - idle) / (float64(writesAlone) / win) // CPU s per write, no watchers
	perEvent := (watchLoad - watchIdle - writeCost*float64(writes)/win) / (float64(writes) / win * n)
	heartbeat := readiness.DefaultHeartbeat.Seconds()
	events5k := 5000 * perEvent / heartbeat
	at5k := 5000*max(idlePerWatch, 0) + events5k

	var b strings.Builder
	fmt.Fprintf(&b, "shared readiness cost: one kube-apiserver, %d watchers (each on its own connection), %s windows\n", p.Watchers, p.ProbeWindow)
	b.WriteString("| Window | Apiserver cores |\n|---|---:|\n")
	fmt.Fprintf(&b, "| apiserver alone (two windows) | %.4f; %.4f |\n", base1, base2)
	fmt.Fprintf(&b, "| + 2 publishers (defaults: 1 s probes, 10 s heartbeat, 15 s lease) | %.4f |\n", withPub)
	fmt.Fprintf(&b, "| + %d watches of the ConfigMap | %.4f |\n", p.Watchers, withWatch)
	fmt.Fprintf(&b, "| watches, publishers stopped | %.4f |\n", watchIdle)
	fmt.Fprintf(&b, "| watches + %d writes/s (%d writes) | %.4f |\n", rate, writes, watchLoad)
	fmt.Fprintf(&b, "| no watches, %d writes/s (%d writes) | %.4f |\n", rate, writesAlone, waitLoad)
	fmt.Fprintf(&b, "\npublishers: %.4f cores; an idle watch: %.4f millicores (noise of the idle baseline: %.4f cores); one event to one watch: %.4f ms; one write: %.2f ms; RSS per watch %.1f KiB\n",
		pubCores, idlePerWatch*1000, base2-base1, perEvent*1000, writeCost*1000, float64(rss1-rss0)/n/1024)
	fmt.Fprintf(&b, "at 5,000 nodes, every watch on one apiserver, 10 s heartbeat: %.3f cores (%.3f of it the heartbeat's events, %.3f the idle watches)\n",
		at5k, events5k, at5k-events5k)
	env.Record("%s", b.String())
	if events5k > 0.1 {
		t.Errorf("the 10 s heartbeat's events to 5,000 watches would cost %.3f cores per apiserver; want well under 0.1", events5k)
	}
}

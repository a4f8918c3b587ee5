package node

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// staticPodUpgrade: the static pod is upgraded twice with
// `extractedprism static-pod upgrade`, as docs/kubeadm.md says, while the
// kubelet, a loop of new TLS connections and 10 watch streams use the
// balancer on 127.0.0.1:7445: first to another image (slot
// extractedprism-b), then back to the first slot with a changed flag. The
// new version binds beside the old one before the old one's manifest goes,
// so nothing may be refused or reset, no connect may take over a second,
// the node stays Ready, and each watch is cut at most once per upgrade
// (the old pod cuts what is left of its streams spread over
// proxy.close_spread at the end of its drain, and they reopen on the new
// pod).
func (c *cluster) staticPodUpgrade(t *testing.T) {
	ep := filepath.Join(filepath.Dir(env.bin.kubectl), "extractedprism")
	if _, err := os.Stat(ep); err != nil {
		t.Fatalf("the upgrade command: %v (make node-e2e builds bin/extractedprism)", err)
	}
	manifests := env.path("manifests")
	c.waitMirrorPod(t, mirrorPod, func(p podObject) bool { return p.ready() })
	nextImage := env.imageRepo + ":" + env.imageTag + "-next"
	if out, err := c.ctr("images", "tag", "--force", imageRef(), nextImage); err != nil {
		t.Fatalf("tag the image under test as %s: %v\n%s", nextImage, err, out)
	}

	ready := startReadyWatch(c)
	load := startConnectLoad(balancerAddr, 2)
	watches := startWatches(t, 10)
	watches.waitOpen(t, 10)
	time.Sleep(3 * time.Second) // a baseline before the first upgrade

	type step struct {
		name, from, to string
		change         func(string) string
		check          func(podObject) bool
	}
	imageLine := regexp.MustCompile(`(?m)^(\s+image: ).*$`)
	steps := []step{
		{
			name: "image " + nextImage, from: "extractedprism.yaml", to: mirrorPodB,
			change: func(m string) string { return imageLine.ReplaceAllString(m, "${1}"+nextImage) },
			check: func(p podObject) bool {
				return len(p.Spec.Containers) == 1 && p.Spec.Containers[0]["image"] == nextImage
			},
		},
		{
			name: "flag --log-format=json", from: "extractedprism-b.yaml", to: mirrorPod,
			change: func(m string) string {
				return reusePortArg.ReplaceAllString(m, "${1}- --reuse-port=true\n${1}- --log-format=json")
			},
			check: func(p podObject) bool { return strings.Contains(fmt.Sprint(p.Spec.Containers), "--log-format=json") },
		},
	}
	maxCutsPerWatch := 0
	for i, s := range steps {
		cur, err := os.ReadFile(filepath.Join(manifests, s.from))
		if err != nil {
			t.Fatalf("upgrade %d (%s): the installed manifest: %v", i+1, s.name, err)
		}
		next := s.change(string(cur))
		if next == string(cur) {
			t.Fatalf("upgrade %d (%s): the change did not apply to %s", i+1, s.name, s.from)
		}
		file := env.path(fmt.Sprintf("upgrade-%d.yaml", i+1))
		if err := os.WriteFile(file, []byte(next), 0o644); err != nil {
			t.Fatal(err)
		}
		oldMirror := mirrorPod
		if s.to == mirrorPod {
			oldMirror = mirrorPodB
		}
		before := watches.cuts()
		began := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		out, err := exec.CommandContext(ctx, ep, "static-pod", "upgrade", "--manifest", file, "--manifest-dir", manifests).CombinedOutput()
		cancel()
		t.Logf("upgrade %d (%s):\n%s", i+1, s.name, out)
		if err != nil {
			t.Fatalf("upgrade %d (%s): extractedprism static-pod upgrade: %v", i+1, s.name, err)
		}
		took := time.Since(began)
		newPod := c.waitMirrorPod(t, s.to, func(p podObject) bool { return p.ready() && s.check(p) })
		// The old pod drains (proxy.drain_timeout, 30 s) and exits; its
		// watches reopen on the new one.
		poll(t, "the old mirror pod "+oldMirror+" gone", 3*time.Minute, time.Second, func() (bool, string) {
			c.checkAlive(t)
			code, _, err := env.api(c.liveAPIServer(), http.MethodGet, "/api/v1/namespaces/kube-system/pods/"+oldMirror, nil)
			if err != nil {
				return false, err.Error()
			}
			return code == http.StatusNotFound, fmt.Sprintf("HTTP %d", code)
		})
		watches.waitOpen(t, 10)
		cuts := watches.cuts()
		perWatch := make([]int, len(cuts))
		total := 0
		for w := range cuts {
			perWatch[w] = cuts[w] - before[w]
			total += perWatch[w]
			maxCutsPerWatch = max(maxCutsPerWatch, perWatch[w])
		}
		env.record("static pod upgrade %d (%s): command %.1f s, %s -> %s; watches cut %d (per watch %v), spread over %.1f s",
			i+1, s.name, took.Seconds(), oldMirror, newPod.Metadata.Name, total, perWatch, watches.spreadSince(began).Seconds())
		if _, err := os.Stat(filepath.Join(manifests, s.from)); !os.IsNotExist(err) {
			t.Errorf("upgrade %d: %s is still in the static pod directory (%v)", i+1, s.from, err)
		}
	}
	time.Sleep(3 * time.Second) // and a tail with the last pod
	counts := load.stop()
	checks, notReady := ready.stop()
	totalCuts := watches.stop()
	fmt.Printf("RESULT staticpod-upgrade refused=%d reset=%d slowest_connect_ms=%d watches_cut=%d\n",
		counts.refused, counts.reset, counts.maxLatency.Milliseconds(), totalCuts)
	env.record("static pod upgrades (2): %d connects, %d ok, %d refused, %d reset, %d other, %d slower than 1 s, slowest ok %d ms; %d watch cuts (at most %d per watch and upgrade); node Ready in %d of %d checks",
		counts.total, counts.ok, counts.refused, counts.reset, counts.other, counts.slow, counts.maxLatency.Milliseconds(),
		totalCuts, maxCutsPerWatch, checks-notReady, checks)
	for _, e := range counts.errs {
		t.Logf("connect: %s", e)
	}
	for _, e := range watches.errors() {
		t.Logf("watch: %s", e)
	}
	if counts.refused+counts.reset+counts.other > 0 {
		t.Errorf("%d connects refused, %d reset, %d failed otherwise during the static pod upgrades; want none: %v",
			counts.refused, counts.reset, counts.other, counts.errs)
	}
	if counts.slow > 0 {
		t.Errorf("%d connects took over 1 s during the static pod upgrades", counts.slow)
	}
	if counts.ok < 50 {
		t.Errorf("only %d successful connects during the upgrades", counts.ok)
	}
	if notReady > 0 {
		t.Errorf("the node was not Ready in %d of %d checks during the static pod upgrades", notReady, checks)
	}
	if maxCutsPerWatch > 1 {
		t.Errorf("a watch was cut %d times in one upgrade; want at most once", maxCutsPerWatch)
	}
}

// reusePortArg is the manifest's --reuse-port line, with its indentation.
var reusePortArg = regexp.MustCompile(`(?m)^(\s+)- --reuse-port=true$`)

// mirrorPodB is the mirror pod of the static pod's second slot.
const mirrorPodB = "extractedprism-b-" + nodeName

// waitMirrorPod waits until the mirror pod name satisfies ok and returns it.
func (c *cluster) waitMirrorPod(t *testing.T, name string, ok func(podObject) bool) podObject {
	t.Helper()
	var p podObject
	poll(t, "mirror pod "+name, 3*time.Minute, 500*time.Millisecond, func() (bool, string) {
		c.checkAlive(t)
		var err error
		p, err = getPod(c.liveAPIServer(), "kube-system", name)
		if err != nil {
			return false, err.Error()
		}
		return ok(p), fmt.Sprintf("phase %s, conditions %+v, containers %+v", p.Status.Phase, p.Status.Conditions, p.Status.ContainerStatuses)
	})
	return p
}

// watchStreams keeps n watches of the node leases open through the
// balancer (the kubelet renews its lease every 10 s, so events flow), each
// on a connection of its own (HTTP/1.1), and opens a watch again at once
// when it is cut. The watches start at resourceVersion 0 (any state the
// apiserver's cache has), as a reflector's first watch after a list may.
type watchStreams struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	open   []bool
	cut    []int
	cutAt  []time.Time
	errs   []string
}

func startWatches(t *testing.T, n int) *watchStreams {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &watchStreams{cancel: cancel, open: make([]bool, n), cut: make([]int, n)}
	for i := range n {
		w.wg.Go(func() { w.run(ctx, i) })
	}
	return w
}

func (w *watchStreams) run(ctx context.Context, i int) {
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: env.caPool, ServerName: "kubernetes", MinVersion: tls.VersionTLS12},
		TLSNextProto:      map[string]func(string, *tls.Conn) http.RoundTripper{}, // HTTP/1.1: a connection per watch
		DisableKeepAlives: true,
	}}
	for ctx.Err() == nil {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet,
			"https://"+balancerAddr+"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases?watch=1&resourceVersion=0&timeoutSeconds=3600", nil)
		if err != nil {
			return
		}
		req.Header.Set("Authorization", "Bearer "+env.adminToken)
		resp, err := client.Do(req)
		if err != nil {
			if ctx.Err() == nil {
				w.note(fmt.Sprintf("watch %d: open: %v", i, err))
				time.Sleep(time.Second) // then try again, as a reflector does
			}
			continue
		}
		if resp.StatusCode != http.StatusOK {
			w.note(fmt.Sprintf("watch %d: HTTP %s", i, resp.Status))
			_ = resp.Body.Close()
			time.Sleep(time.Second)
			continue
		}
		w.mu.Lock()
		w.open[i] = true
		w.mu.Unlock()
		_, err = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		w.mu.Lock()
		w.open[i] = false
		if ctx.Err() == nil {
			w.cut[i]++
			w.cutAt = append(w.cutAt, time.Now())
			w.errs = append(w.errs, fmt.Sprintf("%s watch %d ended: %v", time.Now().Format(time.TimeOnly), i, err))
		}
		w.mu.Unlock()
	}
}

func (w *watchStreams) note(e string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.errs) < 50 {
		w.errs = append(w.errs, time.Now().Format(time.TimeOnly)+" "+e)
	}
}

// waitOpen waits until n watches are open.
func (w *watchStreams) waitOpen(t *testing.T, n int) {
	t.Helper()
	poll(t, fmt.Sprintf("%d watches open through the balancer", n), 2*time.Minute, 200*time.Millisecond, func() (bool, string) {
		w.mu.Lock()
		defer w.mu.Unlock()
		open := 0
		for _, o := range w.open {
			if o {
				open++
			}
		}
		return open >= n, fmt.Sprintf("%d open; %v", open, w.errs)
	})
}

// cuts returns how often each watch was cut so far.
func (w *watchStreams) cuts() []int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.cut)
}

// spreadSince is the time between the first and the last cut after since.
func (w *watchStreams) spreadSince(since time.Time) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	var first, last time.Time
	for _, at := range w.cutAt {
		if at.Before(since) {
			continue
		}
		if first.IsZero() || at.Before(first) {
			first = at
		}
		if at.After(last) {
			last = at
		}
	}
	return last.Sub(first)
}

func (w *watchStreams) errors() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.errs)
}

// stop closes the watches and returns the number of cuts.
func (w *watchStreams) stop() int {
	w.cancel()
	w.wg.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, c := range w.cut {
		n += c
	}
	return n
}

// readyWatch polls the node's Ready condition once a second.
type readyWatch struct {
	stopCh           chan struct{}
	wg               sync.WaitGroup
	mu               sync.Mutex
	checks, notReady int
}

func startReadyWatch(c *cluster) *readyWatch {
	w := &readyWatch{stopCh: make(chan struct{})}
	w.wg.Go(func() {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			n, err := getNode(c.liveAPIServer())
			w.mu.Lock()
			w.checks++
			if err != nil || n.ready().Status != "True" {
				w.notReady++
			}
			w.mu.Unlock()
			select {
			case <-w.stopCh:
				return
			case <-tick.C:
			}
		}
	})
	return w
}

func (w *readyWatch) stop() (checks, notReady int) {
	close(w.stopCh)
	w.wg.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.checks, w.notReady
}

package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

// selfIP is the node address the balancer listens on in this test, on the
// port the kubernetes slice advertises, so that selfIP in the slice is the
// balancer itself.
const selfIP = "198.51.100.50"

// droppedCounts reads extractedprism_discovery_endpoints_dropped_total by
// reason from /metrics, and the size of the page.
func droppedCounts(t *testing.T) (map[string]float64, int) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + adminAddr + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read /metrics: %v", err)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	const prefix = `extractedprism_discovery_endpoints_dropped_total{reason="`
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), prefix)
		if !ok {
			continue
		}
		reason, value, _ := strings.Cut(rest, `"} `)
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", sc.Text(), err)
		}
		out[reason] = v
	}
	return out, len(b)
}

// waitDropped polls /metrics until cond holds for the dropped counts.
func waitDropped(t *testing.T, what string, cond func(map[string]float64) bool) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		got, _ := droppedCounts(t)
		if cond(got) {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; dropped counts %v", what, got)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// rewriteKubernetesSlice replaces the endpoints of default/kubernetes (as
// the cluster admin) with one endpoint per address group.
func rewriteKubernetesSlice(t *testing.T, server string, groups [][]string) {
	t.Helper()
	if out, err := tryRewriteKubernetesSlice(t, server, groups); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
}

// tryRewriteKubernetesSlice is rewriteKubernetesSlice that returns
// kubectl's error.
func tryRewriteKubernetesSlice(t *testing.T, server string, groups [][]string) (string, error) {
	t.Helper()
	var s map[string]any
	if err := json.Unmarshal([]byte(env.MustKubectl(t, server, "", "get", "endpointslice", "kubernetes", "-n", "default", "-o", "json")), &s); err != nil {
		t.Fatal(err)
	}
	eps := make([]map[string]any, 0, len(groups))
	for _, g := range groups {
		eps = append(eps, map[string]any{"addresses": g, "conditions": map[string]any{"ready": true}})
	}
	s["endpoints"] = eps
	delete(s["metadata"].(map[string]any), "resourceVersion")
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := contextWithTimeout(time.Minute)
	defer cancel()
	return env.Kubectl(ctx, server, string(b), "replace", "-f", "-")
}

// upstreamSet renders /status's upstreams as "addr/source" in order.
func upstreamSet(doc status.Document) []string {
	out := make([]string, 0, len(doc.Upstreams))
	for _, u := range doc.Upstreams {
		out = append(out, u.Address+"/"+u.Source)
	}
	return out
}

// TestHostileSlicesChangeNothing writes what no apiserver would into the
// kubernetes EndpointSlice (the balancer's own address, multicast, then
// 3,000 addresses) and adds a second slice with the service's label: the
// daemon's upstreams, its state file and its readiness stay as they were;
// a log line and a counter tell what was dropped. (Loopback and link-local
// addresses the apiserver itself refuses in an EndpointSlice; the state
// file can still hold them, which pkg/discovery's tests cover.)
func TestHostileSlicesChangeNothing(t *testing.T) {
	// The node's own address, as a node has one.
	if out, err := exec.Command("ip", "addr", "add", selfIP+"/32", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("ip addr add %s: %v: %s", selfIP, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "addr", "del", selfIP+"/32", "dev", "lo").Run() })
	a, b, _ := startTwoInSlice(t)

	kc, err := env.TokenKubeconfig("discovery-hostile", "https://"+a.Addr(), env.discToken)
	if err != nil {
		t.Fatal(err)
	}
	// A control plane of two: the cap is its size, so that a flood can
	// add nothing.
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(cfg, []byte("discovery:\n  max_endpoints: 2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(t.TempDir(), "endpoints.json")
	d := env.startDaemon(t, "--config="+cfg,
		"--endpoints="+a.Addr(), "--enable-discovery", "--kubeconfig="+kc, "--state-file="+state,
		"--bind-address="+selfIP, "--bind-port=6443", "--health-port=7446", "--log-level=info")
	both := []string{a.Addr() + "/static", b.Addr() + "/discovered"}
	d.waitStatus(t, "both apiservers up", 2*time.Minute, func(doc status.Document) bool {
		if !slices.Equal(upstreamSet(doc), both) || !doc.Ready {
			return false
		}
		for _, u := range doc.Upstreams {
			if u.State != "up" {
				return false
			}
		}
		return true
	})
	waitState(t, state, []string{a.Addr(), b.Addr()})
	unchanged := func(what string) {
		t.Helper()
		doc, err := d.status()
		if err != nil {
			t.Fatal(err)
		}
		if got := upstreamSet(doc); !slices.Equal(got, both) || !doc.Ready {
			t.Fatalf("%s: upstreams became %v (ready %v), want %v", what, got, doc.Ready, both)
		}
		for _, u := range doc.Upstreams {
			if u.State != "up" {
				t.Fatalf("%s: %s is %s: %s", what, u.Address, u.State, describe(doc))
			}
		}
		waitState(t, state, []string{a.Addr(), b.Addr()})
	}

	// Another slice with the service's label, which anyone allowed to
	// create EndpointSlices in default could add. It is created before
	// the rewrites below, so by the time they are seen it would have been.
	env.MustKubectl(t, a.Addr(), `apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes-extra
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
addressType: IPv4
ports:
- name: https
  port: 6443
endpoints:
- addresses: ["198.51.100.99"]
  conditions: {ready: true}
`, "apply", "-f", "-")

	before, _ := droppedCounts(t)
	out, err := tryRewriteKubernetesSlice(t, a.Addr(), [][]string{
		{apiserverIPs[0]}, {apiserverIPs[1]}, {"127.0.0.1"}, {"169.254.10.10"},
	})
	if err == nil || !strings.Contains(out, "may not be in the loopback range") || !strings.Contains(out, "may not be in the link-local range") {
		t.Fatalf("the apiserver took loopback and link-local addresses in the kubernetes slice (%v): %s", err, out)
	}
	env.Record("kube-apiserver refuses loopback and link-local addresses in an EndpointSlice")
	rewriteKubernetesSlice(t, a.Addr(), [][]string{
		{apiserverIPs[0]}, {apiserverIPs[1]}, {selfIP}, {"239.255.0.1"},
	})
	got := waitDropped(t, "self and multicast drops", func(m map[string]float64) bool {
		return m["self"] > before["self"] && m["multicast"] > before["multicast"]
	})
	t.Logf("dropped after the first rewrite: %v", got)
	unchanged("after the balancer's own address and a multicast one")

	// 3,000 addresses, all below the apiservers' in address order: 750
	// endpoints of 4 (a slice holds at most 1,000 endpoints).
	var flood [][]string
	for i := range 750 {
		var g []string
		for j := 1; j <= 4; j++ {
			g = append(g, fmt.Sprintf("10.%d.%d.%d", j, i/250, i%250+1))
		}
		flood = append(flood, g)
	}
	rewriteKubernetesSlice(t, a.Addr(), append([][]string{{apiserverIPs[0]}, {apiserverIPs[1]}}, flood...))
	got = waitDropped(t, "3,000 addresses over the cap", func(m map[string]float64) bool {
		return m["over_cap"] >= before["over_cap"]+3000
	})
	_, size := droppedCounts(t)
	t.Logf("dropped after the flood: %v; /metrics is %d bytes", got, size)
	unchanged("after 3,000 addresses")
	env.Record("hostile kubernetes slice (the balancer itself, multicast, 3,000 addresses) and a second labelled slice: upstreams unchanged, dropped %v, /metrics %d bytes",
		got, size)

	doc, err := d.status()
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(doc.Discovery.Discovered, "198.51.100.99:6443") {
		t.Fatalf("the second labelled slice was used: %v", doc.Discovery.Discovered)
	}
	logs, err := os.ReadFile(d.p.Log)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"ignoring addresses no API server can have", "reason=self", "reason=multicast", selfIP + ":6443",
		"too many API server endpoints; keeping those in use, then the lowest addresses", "offered=3002",
	} {
		if !strings.Contains(string(logs), want) {
			t.Errorf("daemon log lacks %q:\n%s", want, d.p.Tail(40))
		}
	}
	if n := strings.Count(string(logs), "too many API server endpoints"); n != 1 {
		t.Errorf("%d log lines about the cap, want 1", n)
	}
	env.MustKubectl(t, a.Addr(), "", "delete", "endpointslice", "kubernetes-extra", "-n", "default")
}

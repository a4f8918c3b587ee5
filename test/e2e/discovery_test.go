package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/discovery"
)

// lists records what a discovery.Manager emits, with the time.
type lists struct {
	mu  sync.Mutex
	got [][]discovery.Endpoint
	// syncs are the counts of the sync events, in order.
	syncs []int
}

func (l *lists) event(e discovery.Event) {
	if e.Kind != discovery.EventSync {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.syncs = append(l.syncs, e.Count)
}

// sawEmptySync reports whether a sync with no endpoints was applied.
func (l *lists) sawEmptySync() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Contains(l.syncs, 0)
}

func (l *lists) update(eps []discovery.Endpoint) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.got = append(l.got, eps)
}

func (l *lists) last() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.got) == 0 {
		return ""
	}
	parts := []string{}
	for _, e := range l.got[len(l.got)-1] {
		parts = append(parts, e.Address+"/"+string(e.Source))
	}
	return strings.Join(parts, " ")
}

// waitList polls until the last list renders as want; it returns when.
func (l *lists) waitList(t *testing.T, want string, timeout time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if l.last() == want {
			return time.Now()
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("discovery list is %q after %s, want %q", l.last(), timeout, want)
	return time.Time{}
}

// runManager starts a discovery.Manager; it is stopped at test end.
func runManager(t *testing.T, o discovery.Options) (*discovery.Manager, *lists) {
	t.Helper()
	l := &lists{}
	o.OnUpdate = l.update
	o.OnEvent = l.event
	o.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("manager", o.Service)
	m, err := discovery.New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(time.Minute):
			t.Error("Run did not return")
		}
	})
	return m, l
}

// TestDiscoveryAgainstRealAPIServers drives pkg/discovery directly (no
// proxy in between) against real apiservers, with the restricted RBAC.
func TestDiscoveryAgainstRealAPIServers(t *testing.T) {
	a := env.RunAPIServer(t, apiserverIPs[0])
	b := env.RunAPIServer(t, apiserverIPs[1])
	env.WaitReady(t, a, b)
	env.applyRBAC(t, a.Addr())

	kc, err := env.TokenKubeconfig("discovery-direct", "https://"+a.Addr(), env.discToken)
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(t.TempDir(), "endpoints.json")
	start := time.Now()
	m, l := runManager(t, discovery.Options{
		Static:     []string{a.Addr()},
		Enabled:    true,
		Kubeconfig: kc,
		Debounce:   time.Second,
		StateFile:  state,
	})
	both := fmt.Sprintf("%s/static %s/discovered", a.Addr(), b.Addr())
	at := l.waitList(t, both, time.Minute)
	env.Record("pkg/discovery direct: start -> both apiservers listed: %s", at.Sub(start).Round(time.Millisecond))
	if s := m.Status(); s.State != discovery.StateSynced {
		t.Fatalf("status %+v", s)
	}

	c := env.RunAPIServer(t, apiserverIPs[2])
	ready := env.WaitReady(t, c)
	three := fmt.Sprintf("%s/static %s/discovered %s/discovered", a.Addr(), b.Addr(), c.Addr())
	at = l.waitList(t, three, time.Minute)
	env.Record("pkg/discovery direct: third apiserver ready -> listed: %s (debounce 1s)", at.Sub(ready).Round(time.Millisecond))
	b1, err := os.ReadFile(state)
	if err != nil || !strings.Contains(string(b1), c.Addr()) {
		t.Fatalf("state file %q (%v) does not hold %s", b1, err, c.Addr())
	}

	term := time.Now()
	c.P.Signal(syscall.SIGTERM)
	at = l.waitList(t, both, time.Minute)
	env.Record("pkg/discovery direct: SIGTERM of an apiserver -> removed: %s (debounce 1s)", at.Sub(term).Round(time.Millisecond))
	if err := c.P.Wait(time.Minute); err != nil {
		t.Logf("apiserver %s exit: %v", c.IP, err)
	}

	// The API's own EndpointSlices of another service: only the slice
	// named after it is used (not another one with its label), an IPv6
	// slice, a not-ready endpoint, a port picked by name.
	env.MustKubectl(t, a.Addr(), customSlices("true"), "apply", "-f", "-")
	_, cl := runManager(t, discovery.Options{
		Static:     []string{"192.0.2.1:6443"},
		Enabled:    true,
		Kubeconfig: kc,
		Service:    "e2e-dual",
		Debounce:   200 * time.Millisecond,
	})
	cl.waitList(t, "192.0.2.1:6443/static [2001:db8::10]:8443/discovered [2001:db8::11]:8443/discovered", time.Minute)
	env.MustKubectl(t, a.Addr(), customSlices("false"), "apply", "-f", "-")
	cl.waitList(t, "192.0.2.1:6443/static [2001:db8::10]:8443/discovered", time.Minute)
	env.MustKubectl(t, a.Addr(), "", "delete", "endpointslices", "-l", "kubernetes.io/service-name=e2e-dual")
	// An empty answer never empties the set: the last list stays.
	deadline := time.Now().Add(time.Minute)
	for !cl.sawEmptySync() {
		if time.Now().After(deadline) {
			t.Fatal("the deletion of every slice was not applied within a minute")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := cl.last(); got != "192.0.2.1:6443/static [2001:db8::10]:8443/discovered" {
		t.Fatalf("after deleting every slice the list became %q", got)
	}
	if !slices.Contains(m.Status().Discovered, a.Addr()) {
		t.Fatalf("discovered %v lacks %s", m.Status().Discovered, a.Addr())
	}
}

// customSlices returns two EndpointSlices labelled for service e2e-dual:
// e2e-dual (IPv6) is used, e2e-dual-v4 (another name) is not; ready2 is
// the readiness of the second IPv6 endpoint.
func customSlices(ready2 string) string {
	return `apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: e2e-dual-v4
  namespace: default
  labels:
    kubernetes.io/service-name: e2e-dual
addressType: IPv4
ports:
- name: https
  port: 8443
endpoints:
- addresses: ["192.0.2.10"]
  conditions: {ready: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: e2e-dual
  namespace: default
  labels:
    kubernetes.io/service-name: e2e-dual
addressType: IPv6
ports:
- name: metrics
  port: 9090
- name: https
  port: 8443
endpoints:
- addresses: ["2001:db8::10"]
- addresses: ["2001:db8::11"]
  conditions: {ready: ` + ready2 + `}
`
}

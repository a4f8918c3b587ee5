package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
	"github.com/extractedprism/extractedprism/test/cluster"
)

// env is the shared test environment of this run.
var env *environment

// environment is the shared cluster harness (binaries, credentials,
// processes, etcd, apiservers, kubectl) and what only this module adds:
// extractedprism and the discovery user.
type environment struct {
	*cluster.Env
	daemon    string
	discToken string
}

// proc and apiserver are the harness's processes and apiservers.
type (
	proc      = cluster.Proc
	apiserver = cluster.APIServer
)

// discoveryUser is the restricted user the discovery credentials belong to.
const discoveryUser = cluster.DiscoveryUser

// upstream returns the upstream with an address in a /status document.
var upstream = cluster.Upstream

// clientCert writes a client certificate and key for user cn in groups,
// signed by the cluster's client CA, and returns their paths.
func (e *environment) clientCert(name, cn string, groups ...string) (certFile, keyFile string, err error) {
	return e.CA.Issue(name, cluster.CertSpec{CN: cn, Orgs: groups, Client: true})
}

// anonymousOff are the flags of a control plane that refuses anonymous
// requests altogether (CIS 1.2.1): every request without credentials, the
// health paths included, is answered 401.
var anonymousOff = []string{"--anonymous-auth=false"}

// anonymousHealthOnly writes an AuthenticationConfiguration that allows
// anonymous requests of /livez, /readyz and /healthz only and returns the
// flag that loads it: every other anonymous request is answered 401.
func (e *environment) anonymousHealthOnly(t *testing.T) []string {
	t.Helper()
	p := filepath.Join(e.Dir, "authentication-config.yaml")
	doc := `apiVersion: apiserver.config.k8s.io/v1
kind: AuthenticationConfiguration
anonymous:
  enabled: true
  conditions:
  - path: /livez
  - path: /readyz
  - path: /healthz
`
	if err := os.WriteFile(p, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"--authentication-config=" + p}
}

// applyRBAC grants the discovery user its rights (the one slice named
// after the service) and checks they are no more.
func (e *environment) applyRBAC(t *testing.T, server string) {
	t.Helper()
	// e2e-dual is the service of TestDiscoveryAgainstRealAPIServers.
	e.ApplyDiscoveryRBAC(t, server, "kubernetes", "e2e-dual")
	checks := []struct {
		args []string
		want string
	}{
		{[]string{"list", "endpointslices.discovery.k8s.io/kubernetes", "-n", "default"}, "yes"},
		{[]string{"watch", "endpointslices.discovery.k8s.io/kubernetes", "-n", "default"}, "yes"},
		{[]string{"get", "endpointslices.discovery.k8s.io/kubernetes", "-n", "default"}, "yes"},
		{[]string{"list", "endpointslices.discovery.k8s.io", "-n", "default"}, "no"},
		{[]string{"get", "endpointslices.discovery.k8s.io/kubernetes-extra", "-n", "default"}, "no"},
		{[]string{"list", "endpointslices.discovery.k8s.io", "-n", "kube-system"}, "no"},
		{[]string{"create", "endpointslices.discovery.k8s.io", "-n", "default"}, "no"},
		{[]string{"list", "secrets", "-n", "default"}, "no"},
	}
	for _, c := range checks {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		out, _ := e.Kubectl(ctx, server, "", append([]string{"auth", "can-i", "--as=" + discoveryUser}, c.args...)...)
		cancel()
		if got := strings.TrimSpace(out); got != c.want {
			t.Fatalf("kubectl auth can-i --as=%s %s: %q, want %q", discoveryUser, strings.Join(c.args, " "), got, c.want)
		}
	}
}

// daemon is a running extractedprism.
type daemon struct {
	p     *proc
	start time.Time
	// admin is its admin address (host:port).
	admin string
}

// adminAddr is extractedprism's admin address inside the namespace.
const adminAddr = "127.0.0.1:7446"

// proxyAddr is extractedprism's listener inside the namespace.
const proxyAddr = "127.0.0.1:7445"

// startDaemon runs bin/extractedprism with args, its admin server on
// adminAddr.
func (e *environment) startDaemon(t *testing.T, args ...string) *daemon {
	t.Helper()
	return e.startDaemonAdmin(t, adminAddr, args...)
}

// startDaemonAdmin runs bin/extractedprism with args, its admin server on
// admin.
func (e *environment) startDaemonAdmin(t *testing.T, admin string, args ...string) *daemon {
	t.Helper()
	p, err := e.Start("extractedprism", e.daemon, args...)
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{p: p, start: time.Now(), admin: admin}
	t.Cleanup(func() {
		if p.Running() {
			p.Kill()
		}
		if t.Failed() {
			t.Logf("last lines of extractedprism:\n%s", p.Tail(40))
		}
	})
	return d
}

// status fetches /status.
func (d *daemon) status() (status.Document, error) { return cluster.GetStatus(nil, d.admin) }

// waitStatus polls /status until cond holds and returns the document and
// the time it first held.
func (d *daemon) waitStatus(t *testing.T, what string, timeout time.Duration, cond func(status.Document) bool) (status.Document, time.Time) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last status.Document
	var lastErr error
	for time.Now().Before(deadline) {
		doc, err := d.status()
		if err == nil && cond(doc) {
			return doc, time.Now()
		}
		last, lastErr = doc, err
		if !d.p.Running() {
			t.Fatalf("extractedprism exited while waiting for %s: %v\n%s", what, d.p.Err, d.p.Tail(30))
		}
		time.Sleep(50 * time.Millisecond)
	}
	b, _ := json.MarshalIndent(last, "", "  ")
	t.Fatalf("timed out after %s waiting for %s; last /status (error %v):\n%s", timeout, what, lastErr, b)
	return last, time.Time{}
}

// describe renders the upstreams as "addr(source,state)".
func describe(doc status.Document) string {
	parts := make([]string, 0, len(doc.Upstreams))
	for _, u := range doc.Upstreams {
		parts = append(parts, fmt.Sprintf("%s(%s,%s)", u.Address, u.Source, u.State))
	}
	return strings.Join(parts, " ")
}

// contextWithTimeout is context.WithTimeout on a background context.
func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// startTwoInSlice starts apiservers A and B, applies the discovery RBAC
// and waits until the kubernetes EndpointSlice lists both; the poller
// goes on watching it for the test.
func startTwoInSlice(t *testing.T) (a, b *apiserver, sp *cluster.SlicePoller) {
	t.Helper()
	a = env.RunAPIServer(t, apiserverIPs[0])
	b = env.RunAPIServer(t, apiserverIPs[1])
	env.WaitReady(t, a, b)
	env.applyRBAC(t, a.Addr())
	sp = env.PollSlice(t, apiserverIPs)
	sp.WaitFor(t, "A and B", time.Now(), 2*time.Minute, func(s []string) bool {
		return slices.Equal(s, []string{a.Addr(), b.Addr()})
	})
	return a, b, sp
}

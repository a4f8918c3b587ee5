package e2e

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
	"github.com/extractedprism/extractedprism/test/cluster"
)

// The IPv6-only run's extractedprism: its listener and admin server on
// the IPv6 loopback address.
const (
	proxyAddr6 = "[::1]:7445"
	adminAddr6 = "[::1]:7446"
)

// addrs are the apiservers' host:port, sorted.
func addrs(as []*apiserver) []string {
	out := make([]string, 0, len(as))
	for _, a := range as {
		out = append(out, a.Addr())
	}
	slices.Sort(out)
	return out
}

// upIs reports whether every address in want is an upstream of source
// in state up.
func upIs(doc status.Document, source string, want []string) bool {
	for _, addr := range want {
		if u, ok := upstream(doc, addr); !ok || u.Source != source || u.State != "up" {
			return false
		}
	}
	return true
}

// sliceAddressType is the kubernetes EndpointSlice's address type.
func sliceAddressType(t *testing.T, server string) string {
	t.Helper()
	return env.MustKubectl(t, server, "", "get", "endpointslice", "kubernetes", "-n", "default", "-o", "jsonpath={.addressType}")
}

// kubectlThrough polls until a kubectl run through the balancer on proxy
// reads the ConfigMap name, and returns when.
func kubectlThrough(t *testing.T, proxy, name string) time.Time {
	t.Helper()
	return cluster.Poll(t, "kubectl through "+proxy+" reads configmap "+name, time.Minute, 200*time.Millisecond, func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := env.Kubectl(ctx, proxy, "", "get", "configmap", name, "-n", "default", "-o", "jsonpath={.data.k}")
		if err != nil {
			return false, err.Error()
		}
		return out == name, out
	})
}

// TestIPv6Only runs a control plane whose three apiservers listen on IPv6
// addresses only (their own cluster in the shared etcd, with an IPv6
// service range), and extractedprism on the IPv6 loopback address with
// one static endpoint and discovery: it finds the other two in the
// kubernetes EndpointSlice of address type IPv6, kubectl works through
// [::1]:7445, and keeps working when the static endpoint dies; restarted
// then, extractedprism starts on the IPv6 addresses of its state file.
func TestIPv6Only(t *testing.T) {
	var as []*apiserver
	for _, ip := range cluster.APIServerIPv6[:3] {
		as = append(as, env.RunAPIServer(t, ip, "--etcd-prefix=/registry-ipv6"))
	}
	env.WaitReady(t, as...)
	env.applyRBAC(t, as[0].Addr())
	sp := env.PollSlice(t, cluster.APIServerIPv6[:3])
	sp.WaitFor(t, "the three IPv6 apiservers", time.Now(), 2*time.Minute, func(s []string) bool { return slices.Equal(s, addrs(as)) })
	if got := sliceAddressType(t, as[0].Addr()); got != "IPv6" {
		t.Fatalf("kubernetes EndpointSlice address type %q, want IPv6", got)
	}
	if got := env.MustKubectl(t, as[1].Addr(), "", "get", "service", "kubernetes", "-n", "default", "-o", "jsonpath={.spec.clusterIP}"); got != cluster.ServiceIPv6 {
		t.Fatalf("kubernetes Service ClusterIP %q, want %s", got, cluster.ServiceIPv6)
	}

	kc, err := env.TokenKubeconfig("discovery-ipv6", "https://"+as[0].Addr(), env.discToken)
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(t.TempDir(), "endpoints.json")
	args := []string{
		"--endpoints=" + as[0].Addr(),
		"--enable-discovery",
		"--kubeconfig=" + kc,
		"--state-file=" + state,
		"--bind-address=::1", "--bind-port=7445",
		"--health-bind-address=::1", "--health-port=7446",
		"--drain-timeout=5s",
		"--log-level=debug",
	}
	d := env.startDaemonAdmin(t, adminAddr6, args...)
	doc, at := d.waitStatus(t, "the other two IPv6 apiservers discovered and every upstream up", 2*time.Minute, func(doc status.Document) bool {
		return doc.Ready && upIs(doc, "static", []string{as[0].Addr()}) && upIs(doc, "discovered", []string{as[1].Addr(), as[2].Addr()})
	})
	env.Record("IPv6 only: daemon start -> both other apiservers discovered and up: %s", at.Sub(d.start).Round(time.Millisecond))
	if doc.Listen != proxyAddr6 || !slices.Equal(doc.Discovery.Discovered, addrs(as)) {
		t.Fatalf("/status: listen %q, discovered %v; want %s and %v", doc.Listen, doc.Discovery.Discovered, proxyAddr6, addrs(as))
	}
	waitState(t, state, addrs(as))
	out := env.MustKubectl(t, proxyAddr6, "", "get", "namespaces", "-o", "name")
	if !strings.Contains(out, "namespace/default") {
		t.Fatalf("kubectl get namespaces through %s: %q", proxyAddr6, out)
	}
	name := "e2e-ipv6"
	env.MustKubectl(t, proxyAddr6, "", "create", "configmap", name, "-n", "default", "--from-literal=k="+name)
	if got := env.MustKubectl(t, as[2].Addr(), "", "get", "configmap", name, "-n", "default", "-o", "jsonpath={.data.k}"); got != name {
		t.Fatalf("configmap %s read from %s: %q", name, as[2].Addr(), got)
	}

	as[0].P.Kill()
	killed := time.Now()
	_, down := d.waitStatus(t, "the static endpoint down", time.Minute, func(doc status.Document) bool {
		u, ok := upstream(doc, as[0].Addr())
		return ok && u.State == "down"
	})
	ok := kubectlThrough(t, proxyAddr6, name)
	env.Record("IPv6 only: static apiserver SIGKILL -> down in /status %s; kubectl through [::1]:7445 answers %s after the kill",
		down.Sub(killed).Round(time.Millisecond), ok.Sub(killed).Round(time.Millisecond))

	// Restarted with its one static endpoint dead, extractedprism starts
	// on the IPv6 addresses of its state file.
	if err := d.p.Stop(time.Minute); err != nil {
		t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v\n%s", err, d.p.Tail(20))
	}
	d = env.startDaemonAdmin(t, adminAddr6, args...)
	_, at = d.waitStatus(t, "the state file's IPv6 endpoints up", time.Minute, func(doc status.Document) bool {
		for _, a := range as[1:] {
			if u, ok := upstream(doc, a.Addr()); !ok || u.State != "up" || (u.Source != "state-file" && u.Source != "discovered") {
				return false
			}
		}
		return doc.Ready
	})
	ok = kubectlThrough(t, proxyAddr6, name)
	env.Record("IPv6 only: restart with the static apiserver dead -> state file endpoints up %s, kubectl through [::1]:7445 works %s after start",
		at.Sub(d.start).Round(time.Millisecond), ok.Sub(d.start).Round(time.Millisecond))
}

// TestDualStack runs a dual-stack control plane: three apiservers, each on
// a host of its own with an IPv4 and an IPv6 address, bound to both,
// advertising the IPv4 one, with service ranges of both families. The
// static endpoints are the apiservers' IPv6 addresses, discovery finds
// their IPv4 addresses (the kubernetes EndpointSlice is IPv4): every one
// of the six upstreams is up, kubectl works through the balancer, and an
// apiserver that dies goes down under both its addresses while the others
// carry on.
func TestDualStack(t *testing.T) {
	var as, as6 []*apiserver
	for i := range 3 {
		h := env.AddHost(t, netns, i)
		a := env.RunHostAPIServer(t, h, h.IPv4, "--etcd-prefix=/registry-dual",
			"--service-cluster-ip-range="+cluster.ServiceCIDRv4+","+cluster.ServiceCIDRv6)
		as = append(as, a)
		as6 = append(as6, &apiserver{IP: h.IPv6, P: a.P})
	}
	env.WaitReady(t, as...)
	env.WaitReady(t, as6...)
	env.applyRBAC(t, as[0].Addr())
	sp := env.PollSlice(t, cluster.HostIPv4)
	sp.WaitFor(t, "the three apiservers' IPv4 addresses", time.Now(), 2*time.Minute, func(s []string) bool { return slices.Equal(s, addrs(as)) })
	if got := sliceAddressType(t, as6[0].Addr()); got != "IPv4" {
		t.Fatalf("kubernetes EndpointSlice address type %q, want IPv4", got)
	}

	kc, err := env.TokenKubeconfig("discovery-dual", "https://"+as6[0].Addr(), env.discToken)
	if err != nil {
		t.Fatal(err)
	}
	d := env.startDaemon(t,
		"--endpoints="+strings.Join(addrs(as6), ","),
		"--enable-discovery",
		"--kubeconfig="+kc,
		"--state-file="+filepath.Join(t.TempDir(), "endpoints.json"),
		"--bind-address=127.0.0.1", "--bind-port=7445",
		"--health-bind-address=127.0.0.1", "--health-port=7446",
		"--drain-timeout=5s",
		"--log-level=debug")
	_, at := d.waitStatus(t, "static IPv6 and discovered IPv4 upstreams up", 2*time.Minute, func(doc status.Document) bool {
		return doc.Ready && len(doc.Upstreams) == 6 && upIs(doc, "static", addrs(as6)) && upIs(doc, "discovered", addrs(as))
	})
	env.Record("dual stack: daemon start -> 3 static IPv6 and 3 discovered IPv4 upstreams up: %s", at.Sub(d.start).Round(time.Millisecond))
	name := "e2e-dual-stack"
	env.MustKubectl(t, proxyAddr, "", "create", "configmap", name, "-n", "default", "--from-literal=k="+name)
	kubectlThrough(t, proxyAddr, name)

	as[1].P.Kill()
	killed := time.Now()
	_, down := d.waitStatus(t, "the killed apiserver down under both addresses, the others up", time.Minute, func(doc status.Document) bool {
		u4, ok4 := upstream(doc, as[1].Addr())
		u6, ok6 := upstream(doc, as6[1].Addr())
		// Discovery may drop the IPv4 address once the slice loses it.
		return ok6 && u6.State == "down" && (!ok4 || u4.State == "down") &&
			upIs(doc, "static", []string{as6[0].Addr(), as6[2].Addr()}) && upIs(doc, "discovered", []string{as[0].Addr(), as[2].Addr()})
	})
	ok := kubectlThrough(t, proxyAddr, name)
	env.Record("dual stack: apiserver SIGKILL -> down under both addresses in /status %s; kubectl answers %s after the kill",
		down.Sub(killed).Round(time.Millisecond), ok.Sub(killed).Round(time.Millisecond))
}

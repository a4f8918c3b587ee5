package cluster

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"
)

// Host is a network namespace of its own beside the test namespace, joined
// to it by a veth pair: a machine of the control plane with an address of
// each family, as a dual-stack apiserver has. The test namespace routes
// the host's addresses over the link; the host's default routes lead back
// (IPv4 straight onto the link, IPv6 via GatewayIPv6).
type Host struct {
	// Name is the host's network namespace, Link the test namespace's end
	// of the veth pair.
	Name, Link string
	IPv4, IPv6 string
}

// AddHost creates host i (0, 1, 2: HostIPv4[i] and HostIPv6[i]) for the
// test t; it is deleted when t ends. The test namespace (Netns.Name in
// the environment variable netnsVar) names it.
func (e *Env) AddHost(t testing.TB, netns *Netns, i int) *Host {
	t.Helper()
	h := &Host{Name: netns.HostName(i), Link: fmt.Sprintf("ephost%d", i), IPv4: HostIPv4[i], IPv6: HostIPv6[i]}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", h.Name).CombinedOutput(); err != nil {
			t.Logf("ip netns del %s: %v: %s", h.Name, err, out)
		}
	})
	in := func(args ...string) []string { return append([]string{"-n", h.Name}, args...) }
	steps := [][]string{
		{"netns", "add", h.Name},
		// No duplicate address detection on the link: the addresses
		// are usable at once.
		{"netns", "exec", h.Name, "sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad"},
		{"link", "add", h.Link, "type", "veth", "peer", "name", "eth0", "netns", h.Name},
		{"addr", "add", GatewayIPv6 + "/64", "dev", h.Link, "nodad"},
		{"link", "set", h.Link, "up"},
		in("link", "set", "lo", "up"),
		in("addr", "add", HostPrefix(h.IPv4), "dev", "eth0"),
		in("addr", "add", HostPrefix(h.IPv6), "dev", "eth0", "nodad"),
		in("link", "set", "eth0", "up"),
		in("route", "add", "default", "dev", "eth0"),
		in("-6", "route", "add", "default", "via", GatewayIPv6, "dev", "eth0"),
		{"route", "add", HostPrefix(h.IPv4), "dev", h.Link},
		{"-6", "route", "add", HostPrefix(h.IPv6), "dev", h.Link},
	}
	for _, args := range steps {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("host %s: ip %s: %v: %s", h.Name, strings.Join(args, " "), err, out)
		}
	}
	return h
}

// RunHostAPIServer starts a kube-apiserver on host h for the test t (not
// waiting for it): bound to every address of the host (both families),
// advertising the host's address of the family of advertise's, with etcd
// reached through GatewayIPv4 and the extra flags. It is killed when t
// ends, like RunAPIServer's.
func (e *Env) RunHostAPIServer(t testing.TB, h *Host, advertise string, extra ...string) *APIServer {
	t.Helper()
	args := append([]string{"netns", "exec", h.Name, "unshare"}, e.apiServerArgs(advertise, "::", HostEtcdURL, extra)...)
	p, err := e.Start("apiserver-"+advertise, "ip", args...)
	if err != nil {
		t.Fatal(err)
	}
	a := &APIServer{IP: advertise, P: p, Extra: extra}
	t.Cleanup(func() {
		if a.P.Running() {
			a.P.Kill()
		}
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", a.P.Name, a.P.Tail(15))
		}
	})
	return a
}

// Package e2e runs extractedprism and its discovery against real
// kube-apiservers and etcd.
//
// The test binary creates a network namespace of its own, puts the test API
// server addresses (198.51.100.11-13 and fd00::11-13) on its loopback
// interface and runs itself again inside it (test/cluster's Netns); etcd,
// the apiservers, extractedprism and kubectl all run in there, so no
// traffic leaves the namespace and the ports used (7445, 7446, 2379, 6443)
// cannot collide with anything on the host. TestDualStack's apiservers run
// on three hosts, namespaces of their own joined to the test's by veth
// pairs (198.51.100.21-23 and fd00::21-23), removed with it. The namespace and every
// process left in it are removed when the tests end, whether they passed
// or not.
package e2e

import (
	"fmt"
	"os"
	"testing"

	"github.com/extractedprism/extractedprism/test/cluster"
	"go.uber.org/goleak"
)

// apiserverIPs are the addresses of the IPv4 test apiservers, on the
// namespace's lo.
var apiserverIPs = cluster.APIServerIPv4[:3]

// netns is the namespace the tests run in.
var netns = &cluster.Netns{
	Prefix: "ep-e2e", Tag: "e2e", EnvVar: "EP_E2E_NETNS",
	Addrs: append(append([]string{cluster.GatewayIPv4}, apiserverIPs...), cluster.APIServerIPv6[:3]...),
}

func TestMain(m *testing.M) {
	os.Exit(netns.Main(func() int { return runInside(m) }))
}

// runInside runs the tests inside the namespace with a shared etcd, and
// then looks for goroutines they left running.
func runInside(m *testing.M) int {
	o := cluster.ModuleOptions("e2e", "EP_E2E", discoveryUser)
	o.Hosts = true // TestDualStack's
	code := cluster.RunTests(m, o, func(ce *cluster.Env) {
		env = &environment{Env: ce, daemon: ce.Programs["extractedprism"], discToken: ce.Tokens[discoveryUser]}
	})
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: goroutine leak:", err)
			return 1
		}
	}
	return code
}

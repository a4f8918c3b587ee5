// Package fleet measures what a fleet of extractedprism nodes costs real
// kube-apiservers: probe cost per probe style, discovery watches and their
// convergence, the reconnect wave when an apiserver dies or hangs, the
// probes and discovery requests when every node starts at once, and the
// shared readiness: its publishers and every node's watch of their
// ConfigMap.
//
// The test binary creates a network namespace of its own, puts the test
// apiserver addresses (198.51.100.11-14) on its loopback interface and runs
// itself again inside it (test/cluster's Netns). etcd, the apiservers, every simulated node (one
// extractedprism each, on its own loopback address 127.0.1.x) and every
// client stream run in there, so no traffic leaves the namespace and the
// ports cannot collide with anything on the host. The inner run refuses to
// start anywhere else. The namespace and every process left in it are
// removed when the tests end, whether they passed or not.
//
// Sizes and windows come from the environment (see params): EP_FLEET_NODES
// nodes with EP_FLEET_STREAMS client streams each.
package fleet

import (
	"os"
	"testing"

	"github.com/extractedprism/extractedprism/test/cluster"
)

// apiserverIPs are the addresses of the test apiservers, on the namespace's lo.
var apiserverIPs = cluster.APIServerIPv4

// netns is the namespace the tests run in.
var netns = &cluster.Netns{Prefix: "ep-fleet", Tag: "fleet", EnvVar: "EP_FLEET_NETNS", Addrs: apiserverIPs}

func TestMain(m *testing.M) {
	os.Exit(netns.Main(func() int { return runInside(m) }))
}

// runInside runs the tests inside the namespace with a shared etcd. The
// apiservers' watch caches wait for etcd's progress notifications to serve
// fresh watches and lists of quiet resources; etcd 3.4 sends them every 10
// minutes by default.
func runInside(m *testing.M) int {
	o := cluster.ModuleOptions("fleet", "EP_FLEET", discoveryUser, publisherUser, nodeUser)
	o.EtcdFlags = []string{"--experimental-watch-progress-notify-interval=2s"}
	o.ReportExtra = func() []string { return []string{resultLine()} }
	return cluster.RunTests(m, o, func(ce *cluster.Env) {
		env = &environment{Env: ce, daemon: ce.Programs["extractedprism"], discToken: ce.Tokens[discoveryUser],
			pubToken: ce.Tokens[publisherUser], nodeToken: ce.Tokens[nodeUser]}
	})
}

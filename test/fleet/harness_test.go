package fleet

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/test/cluster"
)

// env is the shared test environment of this run.
var env *environment

// environment is the shared cluster harness (binaries, credentials,
// processes, etcd, apiservers, kubectl) and what only this module adds:
// extractedprism and the restricted users of discovery and the shared
// readiness.
type environment struct {
	*cluster.Env
	daemon    string
	discToken string
	pubToken  string // the readiness publisher's user
	nodeToken string // a node's user, reading the shared readiness
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

// publisherUser and nodeUser are the restricted users of the shared
// readiness: the publisher writes the ConfigMap, a node only reads it.
const (
	publisherUser = "extractedprism-readiness-publisher"
	nodeUser      = "extractedprism-node"
)

// streamAudit records one event per watch of configmaps (the fleet's
// client streams), when its response starts: the moment a stream has
// (re)connected.
const streamAudit = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseComplete", "Panic"]
rules:
- level: Metadata
  verbs: ["watch"]
  resources: [{group: "", resources: ["configmaps"]}]
- level: None
`

// startupAudit records the nodes' probes (GET /readyz) and discovery
// requests (lists and watches of EndpointSlices): one event when each
// response starts (watches) or completes (the rest).
const startupAudit = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "Panic"]
rules:
- level: Metadata
  nonResourceURLs: ["/readyz"]
- level: Metadata
  resources: [{group: "discovery.k8s.io", resources: ["endpointslices"]}]
- level: None
`

// startAPIServer starts a kube-apiserver on ip (not waiting for it) with
// the extra flags. With an audit policy (streamAudit, startupAudit; ""
// for none), the apiserver logs what it selects to a.AuditLog.
func (e *environment) startAPIServer(t *testing.T, ip, audit string, extra ...string) *apiserver {
	t.Helper()
	auditLog := ""
	if audit != "" {
		stamp := time.Now().UnixNano()
		policy := filepath.Join(e.Dir, fmt.Sprintf("audit-policy-%s-%d.yaml", ip, stamp))
		if err := os.WriteFile(policy, []byte(audit), 0o600); err != nil {
			t.Fatal(err)
		}
		auditLog = filepath.Join(e.Dir, fmt.Sprintf("audit-%s-%d.log", ip, stamp))
		extra = append(extra, "--audit-policy-file="+policy, "--audit-log-path="+auditLog,
			"--audit-log-mode=blocking", "--audit-log-format=json")
	}
	a := e.RunAPIServer(t, ip, extra...)
	a.AuditLog = auditLog
	return a
}

// applyRBAC grants the discovery user its rights (every EndpointSlice of
// the default namespace).
func (e *environment) applyRBAC(t *testing.T, server string) {
	t.Helper()
	e.ApplyDiscoveryRBAC(t, server)
}

package cluster

import (
	"strings"
	"testing"
)

// DiscoveryUser is the restricted static token user that discovery's
// credentials belong to.
const DiscoveryUser = "extractedprism-discovery"

// DiscoveryRBAC is the Role and RoleBinding that discovery needs (the
// rules docs/discovery.md documents), bound to DiscoveryUser: get, list
// and watch of the EndpointSlices named, or of every EndpointSlice in the
// default namespace when none is named.
func DiscoveryRBAC(names ...string) string {
	var only string
	if len(names) > 0 {
		only = `  resourceNames: ["` + strings.Join(names, `", "`) + "\"]\n"
	}
	return `apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: extractedprism-discovery
  namespace: default
rules:
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
` + only + `  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: extractedprism-discovery
  namespace: default
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: extractedprism-discovery
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: ` + DiscoveryUser + "\n"
}

// ApplyDiscoveryRBAC applies DiscoveryRBAC(names...) through server.
func (e *Env) ApplyDiscoveryRBAC(t testing.TB, server string, names ...string) {
	t.Helper()
	e.MustKubectl(t, server, DiscoveryRBAC(names...), "apply", "-f", "-")
}

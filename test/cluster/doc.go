// Package cluster runs a real Kubernetes control plane for the test modules
// test/e2e, test/node and test/fleet: a network namespace of the test's
// own, etcd, kube-apiservers with their certificates and tokens, and
// kubectl. It is an ordinary package (not a _test file) so that the three
// modules import one copy; each keeps what only it does (the daemon under
// test, the kubelet and containerd, the simulated fleet) in its own files.
//
// Who owns what:
//
//   - Netns (netns.go): the namespace a test binary re-executes itself in,
//     with the test addresses on its loopback interface, and its removal
//     together with every process left in it.
//   - Procs and Proc (proc.go): child processes with a log file each, which
//     die with the test binary.
//   - CA (pki.go): the test CA and the certificates it signs, the service
//     account key and the static token file.
//   - Env (env.go): one run's work directory, processes, credentials, admin
//     token and report of measured figures; kubeconfigs (kubeconfig.go) and
//     kubectl (kubectl.go) with those credentials.
//   - etcd (etcd.go) and kube-apiserver (apiserver.go): their flags, start,
//     restart and readiness, IPv4, IPv6 or dual-stack (family.go).
//   - SlicePoller (slice.go): the kubernetes EndpointSlice as the
//     apiservers themselves serve it, over time.
//   - Poll (poll.go): waiting for a condition with a deadline.
//
// Nothing here reaches outside the namespace: every address is on the
// namespace's loopback interface (documentation and unique local prefixes),
// and the ports cannot collide with the host's.
package cluster

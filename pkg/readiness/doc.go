// Package readiness shares the apiservers' own readiness between the nodes.
//
// Readiness is a statement an apiserver makes about itself (GET /readyz),
// and it is the same from every node, so it is observed once for the
// cluster instead of by every node: a Publisher, elected among a few
// replicas by a coordination.k8s.io Lease, probes each apiserver and writes
// the explicit answers into one ConfigMap; a Watcher on every node watches
// that ConfigMap alone and answers Lookup for the node's health policy.
//
// What may be in the ConfigMap is narrow on purpose (see Document): only
// explicit /readyz answers, keyed by the addresses the apiservers publish
// in the kubernetes EndpointSlice (or the publisher's static list). A node
// uses a verdict only to lower an upstream's preference, never to add an
// address, and falls back to its own checks when no fresh verdict exists.
package readiness

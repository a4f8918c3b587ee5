// Module cluster is the test cluster that the real-cluster test modules
// (test/e2e, test/node and test/fleet) share: the network namespace, the
// processes, the certificates, etcd, the kube-apiservers and kubectl. It is
// a module of its own, outside the product's go.mod, and needs nothing but
// the standard library and the product's status document.
module github.com/extractedprism/extractedprism/test/cluster

go 1.26.8

require github.com/extractedprism/extractedprism v0.0.0

replace github.com/extractedprism/extractedprism => ../..

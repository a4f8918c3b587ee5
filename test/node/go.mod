// Module node runs extractedprism's container image, kubeadm static pod and
// Helm chart under a real kubelet and containerd. It is a module of its own
// so that nothing it needs reaches the product's go.mod; the Kubernetes
// binaries it runs are pinned in ../e2e/kube.
module github.com/extractedprism/extractedprism/test/node

go 1.26.8

require github.com/extractedprism/extractedprism/test/cluster v0.0.0

require github.com/extractedprism/extractedprism v0.0.0 // indirect

replace github.com/extractedprism/extractedprism/test/cluster => ../cluster

replace github.com/extractedprism/extractedprism => ../..

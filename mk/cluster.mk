# The cluster harness that test/e2e, test/node and test/fleet share
# (test/cluster, a module of its own): the network namespace, the
# processes, the certificates, etcd, the kube-apiservers and kubectl.
#
#   make cluster-test   its unit tests; as root also, in a network namespace
#                       the test creates, etcd and one kube-apiserver on an
#                       IPv6 address (the Kubernetes binaries of make e2e-tools)
#   make cluster-lint   go vet and golangci-lint on test/cluster

.PHONY: cluster-test cluster-lint

## cluster-test: the shared cluster harness's tests (as root with a real etcd and kube-apiserver on IPv6).
cluster-test: need-e2e e2e-tools
	cd test/cluster && EP_CLUSTER_BIN=$(BIN) $(GO) test -race -count=1 -v -timeout 10m ./...

CI_TARGETS += cluster-test

## cluster-lint: go vet and golangci-lint on test/cluster (a module of its own, outside make lint).
cluster-lint: $(BIN)/golangci-lint
	cd test/cluster && $(GO) vet ./... && $(BIN)/golangci-lint run ./...

CI_TARGETS += cluster-lint

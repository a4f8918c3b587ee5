# Node end-to-end tests: the container image, the kubeadm static pod and the
# Helm DaemonSet on a real node (containerd, runc, CNI, kubelet) whose
# kubelet reaches its three kube-apiservers through extractedprism. Runs in
# a network namespace the test creates (needs root). Guide: docs/node-e2e.md.
#
#   make node-e2e         build what is missing and run test/node
#   make node-e2e-tools   only build the Kubernetes commands and helm into bin/
#
# The Kubernetes commands come from the module pinned in test/e2e/kube (the
# same build flags as make e2e, so one build cache serves both). The image
# is built with an explicit version; the test renders the kubeadm manifest
# and the chart with that tag and checks it is the archive's.

NODE_E2E_VERSION   ?= v0.0.0-node-e2e
NODE_E2E_DIR       := dist/node-e2e
NODE_E2E_IMAGE_TAR := $(NODE_E2E_DIR)/extractedprism-image.oci.tar
NODE_E2E_REPO      := ghcr.io/extractedprism/extractedprism
NODE_E2E_TIMEOUT   ?= 30m
NODE_E2E_FLAGS     ?=
NODE_E2E_K8S       := kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl

.PHONY: node-e2e node-e2e-tools node-e2e-image need-node-e2e node-e2e-lint

## need-node-e2e: stop at once, naming the command to run, when a package is missing.
need-node-e2e:
	@missing=; for c in etcd containerd ctr runc unshare ip mount; do \
	  command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	test -x /usr/lib/cni/bridge || missing="$$missing containernetworking-plugins"; \
	if [ -n "$$missing" ]; then \
	  echo "node-e2e needs:$$missing. Run: sudo bash .ci/deps.d/node.sh"; exit 1; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "node-e2e needs root (network namespace, containerd, kubelet)"; exit 1; fi

$(BIN)/kube-controller-manager $(BIN)/kube-scheduler $(BIN)/kubelet: | test/e2e/kube/go.mod
	@mkdir -p $(BIN)
	cd test/e2e/kube && nice $(GO) build -trimpath -ldflags '$(E2E_K8S_LDFLAGS)' -o $@ k8s.io/kubernetes/cmd/$(notdir $@)

$(BIN)/nodetools: FORCE
	cd test/node && CGO_ENABLED=0 $(GO) build -trimpath -o $@ ./nodetools

node-e2e-tools: $(addprefix $(BIN)/,$(NODE_E2E_K8S)) $(BIN)/helm

# The image for the host's architecture only, into a directory of its own
# (make image's archive in dist/ stays as it is).
node-e2e-image:
	$(MAKE) image VERSION=$(NODE_E2E_VERSION) IMAGE_ARCHES=$(HOST_ARCH) \
	  IMAGE_DIR=$(NODE_E2E_DIR)/bin IMAGE_TAR=$(NODE_E2E_IMAGE_TAR)

## node-e2e: the image, the kubeadm static pod and the Helm chart under a real kubelet (root).
node-e2e: need-node-e2e node-e2e-tools node-e2e-image $(BIN)/nodetools $(BIN)/extractedprism
	cd test/node && EP_NODE_BIN=$(BIN) EP_NODE_REPORT=$(BIN)/node-e2e-report.txt \
	  EP_NODE_IMAGE_TAR=$(CURDIR)/$(NODE_E2E_IMAGE_TAR) EP_NODE_IMAGE_REPO=$(NODE_E2E_REPO) \
	  EP_NODE_IMAGE_TAG=$(NODE_E2E_VERSION) \
	  $(GO) test -race -count=1 -v -timeout $(NODE_E2E_TIMEOUT) . $(NODE_E2E_FLAGS)

CI_TARGETS += node-e2e

## node-e2e-lint: go vet and golangci-lint on test/node (a module of its own, outside make lint).
node-e2e-lint: $(BIN)/golangci-lint
	cd test/node && $(GO) vet ./... && $(BIN)/golangci-lint run ./...

CI_TARGETS += node-e2e-lint

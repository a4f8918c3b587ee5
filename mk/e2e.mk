# End-to-end tests: bin/extractedprism and pkg/discovery against real
# kube-apiservers, etcd and kubectl, in a network namespace the test creates
# (needs root, iproute2, util-linux's unshare and etcd; see .ci/deps.d/e2e.sh).
#
#   make e2e            build kube-apiserver and kubectl (once) and run test/e2e
#   make e2e-tools      only build kube-apiserver and kubectl into bin/
#   make e2e E2E_RUN=TestHealthUnderStress/EtcdKilled
#                       run only the tests (or subtests) matching E2E_RUN
#
# kube-apiserver and kubectl come from the Go module proxy, pinned in
# test/e2e/kube/go.mod (a module of its own, never the product's go.mod).
# The first build takes about 9 minutes on 2 cores; later ones are skipped
# while the binaries exist in bin/.

E2E_K8S_VERSION := v1.35.4
E2E_K8S_MINOR   := $(word 2,$(subst ., ,$(E2E_K8S_VERSION)))
E2E_K8S_LDFLAGS := -s -w \
  -X k8s.io/component-base/version.gitVersion=$(E2E_K8S_VERSION) \
  -X k8s.io/component-base/version.gitMajor=1 \
  -X k8s.io/component-base/version.gitMinor=$(E2E_K8S_MINOR) \
  -X k8s.io/client-go/pkg/version.gitVersion=$(E2E_K8S_VERSION) \
  -X k8s.io/client-go/pkg/version.gitMajor=1 \
  -X k8s.io/client-go/pkg/version.gitMinor=$(E2E_K8S_MINOR)
E2E_TIMEOUT     ?= 30m
E2E_RUN         ?=

.PHONY: e2e e2e-tools

$(BIN)/kube-apiserver $(BIN)/kubectl: | test/e2e/kube/go.mod
	@mkdir -p $(BIN)
	cd test/e2e/kube && $(GO) build -trimpath -ldflags '$(E2E_K8S_LDFLAGS)' -o $@ k8s.io/kubernetes/cmd/$(notdir $@)

e2e-tools: $(BIN)/kube-apiserver $(BIN)/kubectl

## e2e: discovery and the daemon against real kube-apiservers and etcd.
e2e: need-e2e e2e-tools $(BIN)/extractedprism
	cd test/e2e && EP_E2E_BIN=$(BIN) EP_E2E_REPORT=$(BIN)/e2e-report.txt \
	  $(GO) test -race -count=1 -v -timeout $(E2E_TIMEOUT) $(if $(E2E_RUN),-run '$(E2E_RUN)') .

CI_TARGETS += e2e

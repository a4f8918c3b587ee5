# Kubernetes deployment: the Helm chart, the kubeadm static pod and the
# container image.
#
#   make chart-test   helm lint --strict, helm template of every value set in
#                     manifests/helm/test/values (checked by kubeconform
#                     against the Kubernetes OpenAPI schemas, offline), the
#                     negative value sets (must fail with the expected
#                     message), helm-unittest suites, the kubeadm manifest
#   make image        OCI image archive (amd64 + arm64) in dist/, no registry
#   make image-test   builds the image twice and inspects the archive

HELM_VERSION          := v3.22.0
HELM_UNITTEST_VERSION := v1.1.2
KUBECONFORM_VERSION   := v0.8.0
K8S_OPENAPI_VERSION   := v1.35.4

CHART_DIR      := manifests/helm/extractedprism
CHART_TEST_DIR := manifests/helm/test
KUBEADM_POD    := manifests/kubeadm/extractedprism.yaml
K8S_HELM_HOME  := $(BIN)/helm-home
K8S_SCHEMAS    := $(BIN)/k8s-schemas/$(K8S_OPENAPI_VERSION)
UNITTEST_DIR   := $(K8S_HELM_HOME)/data/plugins/unittest
HELM           := HELM_CACHE_HOME=$(K8S_HELM_HOME)/cache HELM_CONFIG_HOME=$(K8S_HELM_HOME)/config \
                  HELM_DATA_HOME=$(K8S_HELM_HOME)/data $(BIN)/helm
KUBECONFORM    := $(BIN)/kubeconform -strict -summary \
                  -schema-location '$(K8S_SCHEMAS)/{{ .ResourceKind }}{{ .KindSuffix }}.json'

IMAGE_ARCHES   := amd64 arm64
IMAGE_DIR      := dist/image
IMAGE_TAR      := dist/extractedprism-image.oci.tar
IMAGE_REF      := ghcr.io/extractedprism/extractedprism:$(VERSION)
# Fixed file times in the image: the commit time, so a rebuild of the same
# commit gives the same bytes.
IMAGE_EPOCH    ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)

.PHONY: chart-test chart-lint chart-template chart-negative chart-unittest kubeadm-test \
        chart-docs k8s-tools image image-test

CI_TARGETS += chart-test image-test

# Module source directory of MODULE@VERSION from the module cache (downloads
# it from the module proxy once).
k8s_mod_dir = $$(cd "$$(mktemp -d)" && GOFLAGS= $(GO) mod download -json $(1) | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p')

$(BIN)/helm:
	GOBIN=$(BIN) GOFLAGS= $(GO) install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

$(BIN)/kubeconform:
	GOBIN=$(BIN) GOFLAGS= $(GO) install github.com/yannh/kubeconform/cmd/kubeconform@$(KUBECONFORM_VERSION)

# helm-unittest cannot be go-installed (its go.mod has a replace directive):
# build it from a writable copy of its module source, and lay it out as an
# installed plugin (helm plugin install would download a release).
$(UNITTEST_DIR)/untt:
	set -eu; src=$(call k8s_mod_dir,github.com/helm-unittest/helm-unittest@$(HELM_UNITTEST_VERSION)); \
	  test -d "$$src"; tmp=$$(mktemp -d); cp -r "$$src/." "$$tmp"; chmod -R u+w "$$tmp"; \
	  mkdir -p $(UNITTEST_DIR); \
	  (cd "$$tmp" && CGO_ENABLED=0 GOFLAGS=-mod=mod $(GO) build -trimpath \
	    -ldflags '-s -w -X github.com/helm-unittest/helm-unittest/internal/build.version=$(HELM_UNITTEST_VERSION:v%=%)' \
	    -o $@.tmp ./cmd/helm-unittest); \
	  rm -rf "$$tmp"
	printf '%s\n' 'name: "unittest"' 'version: "$(HELM_UNITTEST_VERSION:v%=%)"' \
	  'usage: "unittest for helm charts"' 'description: "Unit test for helm charts in YAML."' \
	  'ignoreFlags: false' 'command: "$$HELM_PLUGIN_DIR/untt"' > $(UNITTEST_DIR)/plugin.yaml
	mv $@.tmp $@

# Per-kind JSON schemas from the OpenAPI document inside the k8s.io/kubernetes
# module (18 MB zip from the module proxy), generated once.
$(K8S_SCHEMAS)/.done:
	set -eu; src=$(call k8s_mod_dir,k8s.io/kubernetes@$(K8S_OPENAPI_VERSION)); \
	  $(GO) run ./manifests/helm/tools/k8sschema -in "$$src/api/openapi-spec/swagger.json" -out $(K8S_SCHEMAS)
	touch $@

k8s-tools: $(BIN)/helm $(BIN)/kubeconform $(UNITTEST_DIR)/untt $(K8S_SCHEMAS)/.done

# The Go tests render the chart with the real helm and start the real daemon
# with the rendered flags, configuration file and probes; the monitoring
# module decodes the ServiceMonitor and PodMonitor strictly into the
# prometheus-operator API types.
chart-test: chart-lint chart-template chart-negative chart-unittest kubeadm-test $(BIN)/helm $(BIN)/extractedprism
	HELM=$(BIN)/helm EXTRACTEDPRISM=$(BIN)/extractedprism $(GO) test -race -count=1 ./manifests/...
	cd manifests/helm/test/monitoring && HELM=$(BIN)/helm $(GO) test -race -count=1 ./...

chart-lint: $(BIN)/helm
	set -e; for f in $(CHART_TEST_DIR)/values/*.yaml; do \
	  $(HELM) lint --strict --quiet $(CHART_DIR) -f $$f; done

# Every value set renders and every rendered object passes kubeconform.
# The monitoring objects are rendered with the CRD's API announced and
# checked for their shape by the unit tests (their schemas are not in the
# Kubernetes OpenAPI document).
# The rendered sets stay in $(BIN)/chart-render/ (e.g. for a server-side
# dry run against a real API server).
chart-template: $(BIN)/helm $(BIN)/kubeconform $(K8S_SCHEMAS)/.done
	set -euo pipefail; mkdir -p $(BIN)/chart-render; for f in $(CHART_TEST_DIR)/values/*.yaml; do \
	  out=$(BIN)/chart-render/$$(basename $$f); echo "== helm template -f $$f > $$out"; \
	  $(HELM) template extractedprism $(CHART_DIR) --namespace kube-system -f $$f \
	    --api-versions monitoring.coreos.com/v1 > $$out; \
	  $(KUBECONFORM) -skip ServiceMonitor,PodMonitor $$out; \
	done

# Each file in test/negative must make helm template fail with the message
# its first line names ("# expect: ...").
chart-negative: $(BIN)/helm
	@set -uo pipefail; fail=0; for f in $(CHART_TEST_DIR)/negative/*.yaml; do \
	  want=$$(sed -n '1s/^# expect: //p' $$f); \
	  if out=$$($(HELM) template extractedprism $(CHART_DIR) -f $$f 2>&1); then \
	    echo "FAIL $$f: helm template succeeded"; fail=1; \
	  elif ! grep -qF -- "$$want" <<<"$$out"; then \
	    echo "FAIL $$f: want message containing '$$want', got: $$out"; fail=1; \
	  else echo "ok   $$f: $$(grep -F -- "$$want" <<<"$$out" | head -1)"; fi; \
	done; exit $$fail

chart-unittest: $(BIN)/helm $(UNITTEST_DIR)/untt
	$(HELM) unittest --strict --color=false $(CHART_DIR)

kubeadm-test: $(BIN)/kubeconform $(K8S_SCHEMAS)/.done
	$(KUBECONFORM) $(KUBEADM_POD)

## chart-docs: regenerate the values table in the chart README from values.yaml.
chart-docs:
	$(GO) run ./manifests/helm/tools/helmdocs -chart $(CHART_DIR)

$(IMAGE_DIR)/extractedprism-linux-%: FORCE
	CGO_ENABLED=0 GOOS=linux GOARCH=$* $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./cmd/extractedprism

IMAGE_BUILD = cd packaging/image && $(GO) build -o $(BIN)/image-builder . && $(BIN)/image-builder \
	  -ref $(IMAGE_REF) -version $(VERSION) -revision $(COMMIT) -epoch $(IMAGE_EPOCH) \
	  $(foreach a,$(IMAGE_ARCHES),-binary linux/$(a)=$(CURDIR)/$(IMAGE_DIR)/extractedprism-linux-$(a))

## image: OCI image archive of the static binary for amd64 and arm64 (no registry access).
image: $(foreach a,$(IMAGE_ARCHES),$(IMAGE_DIR)/extractedprism-linux-$(a))
	$(IMAGE_BUILD) -out $(CURDIR)/$(IMAGE_TAR)

# Inspects the archive, and builds it a second time from the same binaries:
# the two must be identical.
image-test: image
	cd packaging/image && IMAGE_TAR=$(CURDIR)/$(IMAGE_TAR) IMAGE_ARCHES='$(IMAGE_ARCHES)' \
	  IMAGE_BINARY_DIR=$(CURDIR)/$(IMAGE_DIR) $(GO) test -race -count=1 ./...
	$(IMAGE_BUILD) -out $(CURDIR)/$(IMAGE_TAR).again
	cmp $(IMAGE_TAR) $(IMAGE_TAR).again && rm -f $(IMAGE_TAR).again && echo "image archive is reproducible"

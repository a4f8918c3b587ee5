# extractedprism build entry point. Area-specific targets live in mk/*.mk;
# each fragment may append to CI_TARGETS the targets .ci/run must run after
# `make test`.

SHELL       := /bin/bash
GO          ?= go
BIN         := $(CURDIR)/bin
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT      ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS     := -s -w -X github.com/extractedprism/extractedprism/pkg/version.Version=$(VERSION) \
               -X github.com/extractedprism/extractedprism/pkg/version.Commit=$(COMMIT)
GOLANGCI_LINT_VERSION := v2.15.0
CI_TARGETS  :=

export GOFLAGS := -mod=mod

.PHONY: all build demo test unit lint tools fuzz clean ci-extra

all: build

build: $(BIN)/extractedprism $(BIN)/standin

$(BIN)/extractedprism: FORCE
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./cmd/extractedprism

$(BIN)/standin: FORCE
	CGO_ENABLED=0 $(GO) build -trimpath -o $@ ./test/standin

FORCE:

## demo: start three local stand-in API servers and extractedprism in front of them.
demo: build
	./scripts/demo.sh

## test: unit and integration tests with the race detector, then lint.
test: unit lint

unit:
	$(GO) test -race -count=1 -timeout 20m ./...

$(BIN)/golangci-lint:
	GOBIN=$(BIN) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)

lint: $(BIN)/golangci-lint
	test -z "$$(gofmt -l $$(git ls-files '*.go' | grep -v '^test/e2e/'))" || { gofmt -l .; exit 1; }
	$(GO) vet ./...
	$(BIN)/golangci-lint run ./...

tools: $(BIN)/golangci-lint

## fuzz: fuzz the config loader for 30 s.
fuzz:
	$(GO) test ./pkg/config -run '^$$' -fuzz FuzzLoad -fuzztime 30s

clean:
	rm -rf $(BIN) dist

include $(wildcard mk/*.mk)

## ci-extra: everything .ci/run runs after `make test`.
ci-extra: $(CI_TARGETS)

# ci-targets prints the targets of ci-extra, for .ci/run to time each one.
.PHONY: ci-targets
ci-targets:
	@echo $(CI_TARGETS)

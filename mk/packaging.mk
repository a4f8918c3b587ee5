# Packages (deb, rpm) and the systemd units they ship, tested with dpkg, rpm
# and a real systemd booted in a container.

NFPM_VERSION := v2.45.2
# Package version from git: v1.2.3 -> 1.2.3, v1.2.3-4-gabcdef0 -> 1.2.3+4.gabcdef0,
# no tag -> 0.0.0+git<commits>.g<sha>. Valid for dpkg and rpm alike.
PKG_VERSION ?= $(shell v=$$(git describe --tags --match 'v[0-9]*' 2>/dev/null) && \
	echo "$$v" | sed -e 's/^v//' -e 's/-\([0-9]*\)-g/+\1.g/' -e 's/-/~/g' || \
	echo "0.0.0+git$$(git rev-list --count HEAD 2>/dev/null || echo 0).g$$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
PKG_ARCHES ?= amd64 arm64
PKG_DIST   ?= dist
HOST_ARCH  := $(shell $(GO) env GOARCH)

.PHONY: packages package-test systemd-test systemd-test-clean packaging-lint

$(BIN)/nfpm:
	GOBIN=$(BIN) $(GO) install github.com/goreleaser/nfpm/v2/cmd/nfpm@$(NFPM_VERSION)

## packages: dist/*.deb and dist/*.rpm for $(PKG_ARCHES), version $(PKG_VERSION).
packages: $(BIN)/nfpm
	rm -f $(PKG_DIST)/extractedprism[_-]*.deb $(PKG_DIST)/extractedprism[_-]*.rpm
	mkdir -p $(PKG_DIST) dist/build
	cat packaging/config-header.yaml configs/extractedprism.yaml > dist/build/config.yaml
	set -e; for arch in $(PKG_ARCHES); do \
		CGO_ENABLED=0 GOOS=linux GOARCH=$$arch $(GO) build -trimpath -ldflags '$(LDFLAGS)' \
			-o dist/build/linux-$$arch/extractedprism ./cmd/extractedprism; \
		cp dist/build/linux-$$arch/extractedprism dist/build/extractedprism; \
		for p in deb rpm; do \
			GOARCH=$$arch PKG_VERSION='$(PKG_VERSION)' $(BIN)/nfpm package --config nfpm.yaml \
				--packager $$p --target $(PKG_DIST)/; \
		done; \
	done
	ls -l $(PKG_DIST)/*.deb $(PKG_DIST)/*.rpm

## package-test: package contents, maintainer scripts, unit files (dpkg, rpm, systemd-analyze).
package-test: packages
	$(GO) test -race -count=1 -tags packaging -timeout 10m ./packaging/ -args -dist $(CURDIR)/$(PKG_DIST)

## systemd-test: boot a real systemd (bookworm in systemd-nspawn, cached in .cache/) and
## test the installed .deb: readiness, reload, watchdog, zero refused connects across
## restart and upgrade, purge.
systemd-test:
	$(MAKE) packages PKG_ARCHES=$(HOST_ARCH)
	$(GO) build -o $(BIN)/standin ./test/standin
	$(GO) test -race -count=1 -tags systemdtest -timeout 25m -v ./test/systemd/ -args \
		-repo $(CURDIR) -dist $(CURDIR)/$(PKG_DIST) -standin $(BIN)/standin -nfpm $(BIN)/nfpm

## systemd-test-clean: drop the cached container root.
systemd-test-clean:
	rm -rf .cache/systemd-test

CI_TARGETS += package-test systemd-test

## packaging-lint: shellcheck on the maintainer scripts, golangci-lint on the build-tagged tests.
packaging-lint: $(BIN)/golangci-lint
	shellcheck packaging/scripts/*.sh
	$(BIN)/golangci-lint run --build-tags packaging,systemdtest ./packaging/ ./test/systemd/

CI_TARGETS += packaging-lint

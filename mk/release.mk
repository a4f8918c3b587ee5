# Releases: one version stamped into every artifact, signed, published into
# an apt and a yum repository (scripts/release.sh does the work).
#
#   make release VERSION=v1.2.3   dist/release/v1.2.3/ and dist/repo/{apt,yum}
#                                 (signing key from RELEASE_GPG_KEY_FILE and
#                                 RELEASE_GPG_PASSPHRASE_FILE; docs/releasing.md)
#   make release-test             a release with a throwaway key, installed
#                                 from its repositories (apt in the systemd
#                                 container, dnf --installroot), tampering,
#                                 signatures, SBOMs, reproducibility
#
# VERSION defaults to `git describe` (root Makefile), which must then be a
# tag vX.Y.Z. The apt packages the targets need: .ci/deps.d/release.sh.

CYCLONEDX_GOMOD_VERSION := v1.10.0
RELEASE_DIR    ?= dist/release
REPO_DIR       ?= dist/repo
RELEASE_ARCHES ?= amd64 arm64
# File times in every archive and package: the commit time.
RELEASE_EPOCH  ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
RELEASE_ENV     = VERSION='$(VERSION)' COMMIT='$(COMMIT)' EPOCH='$(RELEASE_EPOCH)' ARCHES='$(RELEASE_ARCHES)' \
                  RELEASE_DIR='$(RELEASE_DIR)' REPO_DIR='$(REPO_DIR)' BIN='$(BIN)' GO='$(GO)' \
                  RELEASE_ALLOW_DIRTY='$(RELEASE_ALLOW_DIRTY)'

# release-test: a throwaway key, releases VERSION and VERSION+1 (the latter
# for the host architecture only, to test the upgrade), everything under
# $(RT_DIR).
RT_DIR          := $(BIN)/release-test
RT_VERSION      := v1.0.0
RT_NEXT_VERSION := v1.0.1

.PHONY: release release-build release-publish release-tools release-deps release-test release-test-key release-repro

$(BIN)/cyclonedx-gomod:
	GOBIN=$(BIN) GOFLAGS= $(GO) install github.com/CycloneDX/cyclonedx-gomod/cmd/cyclonedx-gomod@$(CYCLONEDX_GOMOD_VERSION)

release-tools: $(BIN)/nfpm $(BIN)/helm $(BIN)/cyclonedx-gomod

# The apt packages: installed when missing and running as root, else named.
release-deps:
	@missing=; for t in gpg rpmsign createrepo_c apt-ftparchive jq dnf systemd-nspawn; do \
	  command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "== installing the release tools (missing:$$missing)"; bash .ci/deps.d/release.sh; \
	  else echo "missing:$$missing; run: sudo bash .ci/deps.d/release.sh"; exit 1; fi; fi

## release: build VERSION's artifacts into $(RELEASE_DIR)/VERSION/ and publish them into $(REPO_DIR).
release: release-build release-publish

release-build: release-deps release-tools
	$(RELEASE_ENV) scripts/release.sh build

release-publish: release-deps
	$(RELEASE_ENV) scripts/release.sh publish

# A throwaway RSA signing key with a passphrase (RSA: helm's signer reads no
# other kind).
release-test-key: release-deps
	rm -rf $(RT_DIR)/key && mkdir -p $(RT_DIR)/key && chmod 700 $(RT_DIR)/key
	set -e; export GNUPGHOME=$(RT_DIR)/key/gnupg; mkdir -m 700 $$GNUPGHOME; \
	  head -c 24 /dev/urandom | base64 > $(RT_DIR)/key/passphrase; \
	  gpg --batch --pinentry-mode loopback --passphrase-file $(RT_DIR)/key/passphrase \
	    --quick-gen-key 'extractedprism release test <release-test@extractedprism.invalid>' rsa3072 sign never 2>/dev/null; \
	  gpg --batch --pinentry-mode loopback --passphrase-file $(RT_DIR)/key/passphrase \
	    --armor --export-secret-keys > $(RT_DIR)/key/secret.asc; \
	  gpgconf --kill gpg-agent; rm -rf $$GNUPGHOME

RT_ENV = RELEASE_GPG_KEY_FILE=$(RT_DIR)/key/secret.asc RELEASE_GPG_PASSPHRASE_FILE=$(RT_DIR)/key/passphrase \
         RELEASE_DIR=$(RT_DIR)/release REPO_DIR=$(RT_DIR)/repo

# The same commit and VERSION built a second time, from a clone at another
# path, must give the same bytes (signatures aside: the rpms are compared
# before signing, the chart archive carries helm's packaging time).
release-repro:
	rm -rf $(RT_DIR)/clone $(RT_DIR)/again
	git clone -q --no-hardlinks . $(RT_DIR)/clone
	git -C $(RT_DIR)/clone checkout -q --detach $$(git rev-parse HEAD)
	@git diff --quiet HEAD || echo "release-repro: the working tree differs from HEAD; the clone builds HEAD"
	$(MAKE) -C $(RT_DIR)/clone --no-print-directory release-build BIN=$(BIN) VERSION=$(RT_VERSION) COMMIT=$(COMMIT) \
	  RELEASE_EPOCH=$(RELEASE_EPOCH) $(RT_ENV) RELEASE_DIR=$(RT_DIR)/again
	scripts/release-compare.sh $(RT_DIR)/release/$(RT_VERSION) $(RT_DIR)/again/$(RT_VERSION) \
	  $(RT_DIR)/release/.work/$(RT_VERSION)/pkg/unsigned $(RT_DIR)/again/.work/$(RT_VERSION)/pkg/unsigned

## release-test: release with a throwaway key; install from its apt repository under systemd and with dnf; tampering, signatures, SBOMs, reproducibility.
release-test: release-test-key $(BIN)/standin
	rm -rf $(RT_DIR)/release $(RT_DIR)/repo $(RT_DIR)/next
	$(MAKE) --no-print-directory release VERSION=$(RT_VERSION) $(RT_ENV)
	$(MAKE) --no-print-directory release-build VERSION=$(RT_NEXT_VERSION) RELEASE_ARCHES=$(HOST_ARCH) \
	  $(RT_ENV) RELEASE_DIR=$(RT_DIR)/next
	$(MAKE) --no-print-directory release-repro
	$(GO) test -race -count=1 -tags releasetest -timeout 15m -v ./test/release/ -args \
	  -release $(RT_DIR)/release/$(RT_VERSION) -repo $(RT_DIR)/repo -version $(RT_VERSION) -src $(CURDIR) \
	  -helm $(BIN)/helm -key $(RT_DIR)/key/secret.asc -passphrase $(RT_DIR)/key/passphrase
	$(GO) test -race -count=1 -tags systemdtest -timeout 20m -v -run TestReleaseRepositories ./test/systemd/ -args \
	  -repo $(CURDIR) -standin $(BIN)/standin -release-test $(RT_DIR) \
	  -release-version $(RT_VERSION) -release-next $(RT_NEXT_VERSION)

CI_TARGETS += release-test

#!/usr/bin/env bash
# Builds a release of extractedprism and publishes it into an apt and a yum
# repository. Run through make (mk/release.mk), which sets the variables:
#
#   scripts/release.sh build     artifacts in $RELEASE_DIR/$VERSION/
#   scripts/release.sh publish   add that release to $REPO_DIR/apt and $REPO_DIR/yum
#
# VERSION      vMAJOR.MINOR.PATCH[-PRERELEASE], stamped into everything
# COMMIT       source revision (labels, `extractedprism version`)
# EPOCH        Unix time of every file time stamp (the commit time)
# ARCHES       Go architectures (amd64 arm64)
# RELEASE_DIR  where releases go (one folder per version)
# REPO_DIR     the repositories a release is published into
# BIN          the tools: nfpm, helm, cyclonedx-gomod, image-builder
# RELEASE_GPG_KEY_FILE         ASCII-armoured secret signing key
# RELEASE_GPG_PASSPHRASE_FILE  its passphrase (one line)
# RELEASE_ALLOW_DIRTY=1        build from a tree with uncommitted changes (a trial)
#
# Nothing in a release depends on the time or the path it was built at:
# two builds of the same commit and VERSION give identical files, except
# the signatures (SHA256SUMS.asc, the chart's .prov, the rpms' signature
# headers) and the chart archive (helm stamps the packaging time).
set -euo pipefail
export LC_ALL=C TZ=UTC

: "${VERSION:?}" "${COMMIT:?}" "${EPOCH:?}" "${ARCHES:?}" "${RELEASE_DIR:?}" "${REPO_DIR:?}" "${BIN:?}"
GO=${GO:-go}
NAME=extractedprism
IMAGE_REPO=ghcr.io/extractedprism/extractedprism
MODULE=github.com/extractedprism/extractedprism

die() {
	echo "release: $*" >&2
	exit 1
}
step() { echo "== release $VERSION: $*"; }

[[ $VERSION =~ ^v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$ ]] ||
	die "VERSION=$VERSION: want vMAJOR.MINOR.PATCH or vMAJOR.MINOR.PATCH-PRERELEASE (semantic versioning, e.g. v1.2.3), set VERSION= or tag the commit"
SEMVER=${VERSION#v}
# deb and rpm: a pre-release sorts before its release with "~" (1.2.3~rc.1 < 1.2.3).
PKG_VERSION=${SEMVER/-/\~}

need_tools() {
	local missing=()
	for t in gpg gpgv rpmsign createrepo_c apt-ftparchive jq sha256sum tar gzip; do
		command -v "$t" >/dev/null || missing+=("$t")
	done
	((${#missing[@]} == 0)) || die "missing ${missing[*]}: run: bash .ci/deps.d/release.sh"
	for t in nfpm helm cyclonedx-gomod; do
		[[ -x $BIN/$t ]] || die "missing $BIN/$t (make installs it)"
	done
}

# gpg_setup imports the signing key into a throwaway GnuPG home; every gpg
# run (also rpmsign's) then signs with it without asking for a passphrase.
gpg_setup() {
	[[ -n ${RELEASE_GPG_KEY_FILE:-} && -n ${RELEASE_GPG_PASSPHRASE_FILE:-} ]] ||
		die "set RELEASE_GPG_KEY_FILE (ASCII-armoured secret key) and RELEASE_GPG_PASSPHRASE_FILE; see docs/releasing.md"
	[[ -r $RELEASE_GPG_KEY_FILE ]] || die "RELEASE_GPG_KEY_FILE=$RELEASE_GPG_KEY_FILE: not readable"
	[[ -r $RELEASE_GPG_PASSPHRASE_FILE ]] || die "RELEASE_GPG_PASSPHRASE_FILE=$RELEASE_GPG_PASSPHRASE_FILE: not readable"
	GNUPGHOME=$(mktemp -d /tmp/extractedprism-release-gpg.XXXXXX)
	export GNUPGHOME
	trap 'gpgconf --kill gpg-agent >/dev/null 2>&1 || true; rm -rf "$GNUPGHOME"' EXIT
	printf '%s\n' batch no-tty 'pinentry-mode loopback' "passphrase-file $(realpath "$RELEASE_GPG_PASSPHRASE_FILE")" \
		'personal-digest-preferences SHA512' 'cert-digest-algo SHA512' >"$GNUPGHOME/gpg.conf"
	echo allow-loopback-pinentry >"$GNUPGHOME/gpg-agent.conf"
	gpg --quiet --import "$RELEASE_GPG_KEY_FILE" 2>/dev/null || die "RELEASE_GPG_KEY_FILE: gpg cannot import it (wrong passphrase?)"
	FPR=$(gpg --with-colons --list-secret-keys | awk -F: '$1 == "fpr" { print $10; exit }')
	[[ -n $FPR ]] || die "RELEASE_GPG_KEY_FILE holds no secret key"
	KEY_UID=$(gpg --with-colons --list-secret-keys | awk -F: '$1 == "uid" { print $10; exit }')
	echo test | gpg --quiet --local-user "$FPR" --detach-sign >/dev/null || die "cannot sign with $FPR (wrong passphrase?)"
	echo "release: signing with $FPR ($KEY_UID)"
}

# deterministic_tgz DIR NAME OUT: tar.gz of DIR/NAME, file times EPOCH,
# owner root, sorted, no gzip time stamp.
deterministic_tgz() {
	tar -C "$1" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" \
		--format=gnu -cf - "$2" | gzip -9n >"$3"
}

build() {
	need_tools
	if [[ ${RELEASE_ALLOW_DIRTY:-} != 1 ]] && [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
		die "the working tree has uncommitted changes, which the release would carry under commit $COMMIT: commit them (or set RELEASE_ALLOW_DIRTY=1 for a trial build)"
	fi
	gpg_setup
	local out=$RELEASE_DIR/$VERSION work=$RELEASE_DIR/.work/$VERSION
	rm -rf "$out" "$work"
	mkdir -p "$out" "$work"
	local ldflags="-s -w -X $MODULE/pkg/version.Version=$VERSION -X $MODULE/pkg/version.Commit=$COMMIT"

	for arch in $ARCHES; do
		step "binary linux/$arch"
		local dir=$work/$NAME-$VERSION-linux-$arch
		mkdir -p "$dir"
		# -buildvcs=false: VERSION and COMMIT are stamped explicitly, and the
		# VCS fields Go would add depend on the kind of checkout (a git
		# worktree gets none), not on the source.
		CGO_ENABLED=0 GOOS=linux GOARCH=$arch GOFLAGS=-mod=readonly $GO build -trimpath -buildvcs=false -ldflags "$ldflags" \
			-o "$dir/$NAME" ./cmd/extractedprism
		cp LICENSE README.md "$dir/"
		chmod 0755 "$dir/$NAME"
		chmod 0644 "$dir/LICENSE" "$dir/README.md"
		touch -d "@$EPOCH" "$dir" "$dir"/*
		deterministic_tgz "$work" "$NAME-$VERSION-linux-$arch" "$out/$NAME-$VERSION-linux-$arch.tar.gz"

		step "SBOM of the linux/$arch binary"
		"$BIN/cyclonedx-gomod" bin -json -noserial -notimestamp -version "$VERSION" \
			-output "$out/$NAME-$VERSION-linux-$arch.sbom.cdx.json" "$dir/$NAME"
	done

	step "deb and rpm packages"
	local stage=$work/pkg
	mkdir -p "$stage/unsigned"
	cat packaging/config-header.yaml configs/extractedprism.yaml >"$stage/config.yaml"
	sed "s#dist/build/#$stage/#g" nfpm.yaml >"$stage/nfpm.yaml"
	for arch in $ARCHES; do
		cp "$work/$NAME-$VERSION-linux-$arch/$NAME" "$stage/$NAME"
		for p in deb rpm; do
			GOARCH=$arch PKG_VERSION=$PKG_VERSION SOURCE_DATE_EPOCH=$EPOCH \
				"$BIN/nfpm" package --config "$stage/nfpm.yaml" --packager "$p" --target "$stage/unsigned/" >/dev/null
		done
	done
	cp "$stage"/unsigned/*.deb "$out/"
	for rpm in "$stage"/unsigned/*.rpm; do
		cp "$rpm" "$out/"
		rpmsign --define "__gpg $(command -v gpg)" --define "_gpg_name $FPR" --addsign "$out/$(basename "$rpm")" >/dev/null
	done

	step "OCI image $IMAGE_REPO:$VERSION"
	(cd packaging/image && GOFLAGS=-mod=mod $GO build -o "$BIN/image-builder" .)
	local bins=()
	for arch in $ARCHES; do bins+=(-binary "linux/$arch=$(realpath "$work/$NAME-$VERSION-linux-$arch/$NAME")"); done
	"$BIN/image-builder" -ref "$IMAGE_REPO:$VERSION" -version "$VERSION" -revision "$COMMIT" -epoch "$EPOCH" \
		"${bins[@]}" -out "$(realpath "$out")/$NAME-$VERSION-image.oci.tar" 2>/dev/null
	image_sbom "$out/$NAME-$VERSION-image.oci.tar" "$work/image"

	step "Helm chart $SEMVER (appVersion $VERSION), signed"
	# helm reads secret keys from a keyring file in OpenPGP format. It is
	# written inside the temporary GNUPGHOME (mode 0700, removed on every
	# exit, a failed helm included), readable by its owner alone.
	local secring=$GNUPGHOME/secring.gpg
	(umask 077 && gpg --export-secret-keys "$FPR" >"$secring")
	HELM_CACHE_HOME=$work/helm HELM_CONFIG_HOME=$work/helm HELM_DATA_HOME=$work/helm \
		"$BIN/helm" package manifests/helm/extractedprism --version "$SEMVER" --app-version "$VERSION" \
		--sign --key "$KEY_UID" --keyring "$secring" --passphrase-file "$RELEASE_GPG_PASSPHRASE_FILE" \
		--destination "$out" >/dev/null
	rm -f "$secring"

	step "kubeadm static pod manifest"
	local pod=manifests/kubeadm/extractedprism.yaml
	[[ $(grep -c "^      image: $IMAGE_REPO:dev\$" "$pod") == 1 ]] || die "$pod: want one line 'image: $IMAGE_REPO:dev' to stamp"
	sed -e "s#^      image: $IMAGE_REPO:dev\$#      image: $IMAGE_REPO:$VERSION#" \
		-e '/^      # A release stamps its version here/,/^      # "dev" is the unreleased tree/d' \
		"$pod" >"$out/$NAME-$VERSION-kubeadm.yaml"

	step "CHANGELOG.md section"
	changelog >"$out/CHANGELOG.md"

	step "public key, SHA256SUMS and its signature"
	gpg --armor --export "$FPR" >"$out/$NAME-release-key.asc"
	(cd "$out" && find . -maxdepth 1 -type f ! -name 'SHA256SUMS*' -printf '%f\n' | sort | xargs sha256sum >SHA256SUMS)
	gpg --local-user "$FPR" --armor --detach-sign --output "$out/SHA256SUMS.asc" "$out/SHA256SUMS"
	find "$out" -type f -exec touch -d "@$EPOCH" {} +
	echo "release: $out"
	(cd "$out" && ls -l)
}

# image_sbom ARCHIVE WORKDIR: one SBOM per platform of the image, made from
# the binary taken out of the image archive itself (the image holds nothing
# else but /etc/passwd, /etc/group and two empty directories).
image_sbom() {
	local archive=$1 work=$2
	rm -rf "$work" && mkdir -p "$work/oci"
	tar -C "$work/oci" -xf "$archive"
	local index manifest platform layer
	index=$(jq -r '.manifests[0].digest | sub(":"; "/")' "$work/oci/index.json")
	while read -r manifest platform; do
		[[ -n $manifest ]] || continue
		layer=$(jq -r '.layers[-1].digest | sub(":"; "/")' "$work/oci/blobs/$manifest")
		mkdir -p "$work/$platform"
		tar -C "$work/$platform" -xzf "$work/oci/blobs/$layer" usr/bin/extractedprism
		step "SBOM of the image, $platform"
		"$BIN/cyclonedx-gomod" bin -json -noserial -notimestamp -version "$VERSION" \
			-output "$(dirname "$archive")/$NAME-$VERSION-image-${platform/\//-}.sbom.cdx.json" \
			"$work/$platform/usr/bin/extractedprism"
	done < <(jq -r '.manifests[] | "\(.digest | sub(":"; "/")) \(.platform.os)/\(.platform.architecture)"' "$work/oci/blobs/$index")
	ls "$(dirname "$archive")"/*image-linux-*.sbom.cdx.json >/dev/null || die "no SBOM made from $archive"
}

# changelog prints CHANGELOG.md's section for VERSION ("## vX.Y.Z"), or
# the "## Unreleased" section titled with VERSION when there is none yet.
changelog() {
	local section
	section=$(awk -v v="## $VERSION" '$0 == v || index($0, v " ") == 1 { p = 1; print; next } /^## / { p = 0 } p' CHANGELOG.md)
	if [[ -z $section ]]; then
		echo "release: CHANGELOG.md has no section \"## $VERSION\"; using \"## Unreleased\"" >&2
		section=$(awk -v v="## $VERSION" '/^## Unreleased/ { p = 1; print v; next } /^## / { p = 0 } p' CHANGELOG.md)
	fi
	[[ -n $section ]] || die "CHANGELOG.md has neither \"## $VERSION\" nor \"## Unreleased\""
	printf '# extractedprism %s\n\n%s\n' "$VERSION" "$section"
}

publish() {
	need_tools
	gpg_setup
	local out=$RELEASE_DIR/$VERSION
	[[ -f $out/SHA256SUMS ]] || die "no release in $out: run make release first"
	(cd "$out" && sha256sum --quiet -c SHA256SUMS) || die "$out does not match its SHA256SUMS"
	local apt=$REPO_DIR/apt yum=$REPO_DIR/yum
	mkdir -p "$apt/pool/main/e/$NAME" "$yum/Packages"

	step "apt repository $apt (stable main)"
	cp "$out"/*.deb "$apt/pool/main/e/$NAME/"
	local debarch
	for debarch in amd64 arm64; do
		local d=$apt/dists/stable/main/binary-$debarch
		mkdir -p "$d"
		(cd "$apt" && apt-ftparchive --arch "$debarch" packages pool) >"$d/Packages"
		gzip -9nc "$d/Packages" >"$d/Packages.gz"
	done
	(cd "$apt" && apt-ftparchive \
		-o APT::FTPArchive::Release::Origin=extractedprism -o APT::FTPArchive::Release::Label=extractedprism \
		-o APT::FTPArchive::Release::Suite=stable -o APT::FTPArchive::Release::Codename=stable \
		-o APT::FTPArchive::Release::Architectures="amd64 arm64" -o APT::FTPArchive::Release::Components=main \
		-o APT::FTPArchive::Release::Description="extractedprism packages" \
		release dists/stable) >"$apt/Release.tmp"
	mv "$apt/Release.tmp" "$apt/dists/stable/Release"
	rm -f "$apt/dists/stable/InRelease" "$apt/dists/stable/Release.gpg"
	gpg --local-user "$FPR" --clearsign --output "$apt/dists/stable/InRelease" "$apt/dists/stable/Release"
	gpg --local-user "$FPR" --armor --detach-sign --output "$apt/dists/stable/Release.gpg" "$apt/dists/stable/Release"

	step "yum repository $yum"
	cp "$out"/*.rpm "$yum/Packages/"
	createrepo_c --quiet --update "$yum"
	rm -f "$yum/repodata/repomd.xml.asc"
	gpg --local-user "$FPR" --armor --detach-sign --output "$yum/repodata/repomd.xml.asc" "$yum/repodata/repomd.xml"

	step "public keys"
	gpg --export "$FPR" >"$REPO_DIR/$NAME-archive-keyring.gpg"
	gpg --armor --export "$FPR" >"$REPO_DIR/$NAME-release-key.asc"
	cp "$REPO_DIR/$NAME-release-key.asc" "$yum/RPM-GPG-KEY-$NAME"
	echo "release: published $VERSION into $REPO_DIR"
}

case "${1:-}" in
build) build ;;
publish) publish ;;
*) die "usage: $0 build|publish (run it through make release)" ;;
esac

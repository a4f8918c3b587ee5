#!/usr/bin/env bash
# Tools for make release and make release-test: GnuPG to sign, rpmsign (rpm)
# for the rpms, createrepo-c and apt-ftparchive (apt-utils) for the yum and
# apt repositories, jq to read the image index, dnf to install from the yum
# repository into a throwaway root; systemd-nspawn and debootstrap to install
# from the apt repository under a real systemd (as make systemd-test does).
set -euo pipefail
apt-get install -y -qq --no-install-recommends \
	gnupg gpgv rpm createrepo-c apt-utils jq dnf \
	systemd systemd-container debootstrap dpkg-dev >/dev/null

#!/usr/bin/env bash
# Tools for make package-test and make systemd-test: dpkg and rpm to inspect
# and install packages, systemd-analyze to check the units, debootstrap and
# systemd-nspawn to boot a real systemd in a container.
set -euo pipefail
apt-get install -y -qq --no-install-recommends \
	systemd systemd-container debootstrap rpm dpkg-dev procps shellcheck >/dev/null

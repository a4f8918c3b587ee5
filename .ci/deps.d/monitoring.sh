#!/usr/bin/env bash
# promtool checks and unit-tests the Prometheus alert rules in
# manifests/monitoring (pkg/metrics TestPromtool). Only the promtool binary
# is taken from Debian's prometheus package, so no Prometheus server is
# installed or started.
set -euo pipefail
command -v promtool >/dev/null && exit 0
tmp=$(mktemp -d)
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && { apt-get download -qq prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download -qq prometheus >/dev/null; }; })
dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
install -m 0755 "$tmp/root/usr/bin/promtool" /usr/local/bin/promtool
promtool --version | head -1

#!/bin/sh
# extractedprism pre-removal script (deb prerm, rpm %preun).
# On removal stop and disable the socket and the service; on upgrade do
# nothing (the post-installation script restarts the service).
set -e

case "$1" in
remove | 0) ;; # deb: remove; rpm: erase (no version left)
*) exit 0 ;;   # deb: upgrade, deconfigure, failed-upgrade; rpm: upgrade
esac

root=""
live=yes
if [ -n "${DPKG_ROOT:-}" ]; then
	root="--root=$DPKG_ROOT"
	live=no
fi
[ -d /run/systemd/system ] || live=no
command -v systemctl >/dev/null 2>&1 || exit 0

if [ "$live" = yes ]; then
	# The socket first: a connect to it would start the service again.
	systemctl stop extractedprism.socket extractedprism.service || true
fi
# shellcheck disable=SC2086 # $root is empty or one word
systemctl $root disable extractedprism.socket extractedprism.service >/dev/null 2>&1 || true
exit 0

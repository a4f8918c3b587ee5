#!/bin/sh
# extractedprism post-installation script (deb postinst, rpm %post).
# First install: enable the socket and the service, but do not start them:
# the shipped /etc/extractedprism/config.yaml lists no API server yet.
# Upgrade: restart the service if it was running. The socket unit is left
# alone, so systemd keeps the listening sockets open and queues connects
# while the new binary starts: the upgrade refuses no connection.
set -e

upgrade=no
case "$1" in
configure) [ -z "$2" ] || upgrade=yes ;; # deb: configure [old-version]
abort-*) exit 0 ;;
1) ;;                 # rpm: first install
[0-9]*) upgrade=yes ;; # rpm: upgrade (2 or more versions installed)
*) ;;
esac

# DPKG_ROOT is set when dpkg installs into another root without chroot:
# change only that root, and do not touch the running system.
root=""
live=yes
if [ -n "${DPKG_ROOT:-}" ]; then
	root="--root=$DPKG_ROOT"
	live=no
fi
[ -d /run/systemd/system ] || live=no
command -v systemctl >/dev/null 2>&1 || exit 0

if [ "$live" = yes ]; then
	systemctl daemon-reload || true
fi

if [ "$upgrade" = no ]; then
	# shellcheck disable=SC2086 # $root is empty or one word
	systemctl $root enable extractedprism.socket extractedprism.service >/dev/null 2>&1 || true
	if [ "$live" = yes ]; then
		echo "extractedprism: edit /etc/extractedprism/config.yaml (endpoints), then: systemctl start extractedprism"
	fi
elif [ "$live" = yes ]; then
	systemctl try-restart extractedprism.service || true
fi
exit 0

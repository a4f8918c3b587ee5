#!/bin/sh
# extractedprism post-removal script (deb postrm, rpm %postun).
# deb purge and rpm erase delete the state directory (the last-known-good
# list of discovered API servers); deb remove keeps it. dpkg deletes the
# configuration file itself on purge.
set -e

purge=no
case "$1" in
purge | 0) purge=yes ;; # deb: purge; rpm: erase (no version left)
remove) ;;
*) exit 0 ;; # deb: upgrade, failed-upgrade, abort-*, disappear; rpm: upgrade
esac

live=yes
[ -z "${DPKG_ROOT:-}" ] || live=no
[ -d /run/systemd/system ] || live=no
if [ "$live" = yes ] && command -v systemctl >/dev/null 2>&1; then
	systemctl daemon-reload || true
	systemctl reset-failed extractedprism.service extractedprism.socket >/dev/null 2>&1 || true
fi

if [ "$purge" = yes ]; then
	# StateDirectory= with DynamicUser=yes lives in /var/lib/private and is
	# reached through the /var/lib/extractedprism symlink.
	rm -rf "${DPKG_ROOT:-}/var/lib/private/extractedprism" "${DPKG_ROOT:-}/var/lib/extractedprism"
	rmdir "${DPKG_ROOT:-}/etc/extractedprism" 2>/dev/null || true
fi
exit 0

#!/usr/bin/env bash
# release-compare.sh A B A_UNSIGNED B_UNSIGNED: compares two builds of the
# same release byte for byte. Every file must be in both. Signatures differ
# by nature (they hold their creation time): *.asc, *.prov, SHA256SUMS
# (it lists the signed rpms) are not compared, and the rpms are compared as
# built, before signing (A_UNSIGNED, B_UNSIGNED). The Helm chart archive is
# compared and reported, but helm writes its packaging time into it, so a
# difference there does not fail.
set -euo pipefail
a=$1 b=$2 ua=$3 ub=$4
fail=0 same=0
list() { (cd "$1" && find . -type f -printf '%P\n' | sort); }
if ! diff <(list "$a") <(list "$b") >/dev/null; then
	echo "release-compare: the two builds hold different files:"
	diff <(list "$a") <(list "$b") || true
	exit 1
fi
check() { # label file-a file-b required
	if cmp -s "$2" "$3"; then
		same=$((same + 1))
		printf 'identical  %s\n' "$1"
	elif [[ $4 == required ]]; then
		fail=1
		printf 'DIFFERENT  %s (first difference: %s)\n' "$1" "$(cmp "$2" "$3" 2>&1 | head -1)"
	else
		printf 'different  %s (expected: %s)\n' "$1" "$4"
	fi
}
while read -r f; do
	case $f in
	*.asc | *.prov | SHA256SUMS) printf 'skipped    %s (signature)\n' "$f" ;;
	*.rpm) printf 'skipped    %s (signed; compared before signing below)\n' "$f" ;;
	*.tgz) check "$f" "$a/$f" "$b/$f" "helm stamps the packaging time" ;;
	*) check "$f" "$a/$f" "$b/$f" required ;;
	esac
done < <(list "$a")
while read -r f; do
	check "$f (before signing)" "$ua/$f" "$ub/$f" required
done < <(cd "$ua" && find . -name '*.rpm' -printf '%P\n' | sort)
if ((fail)); then
	echo "release-compare: the builds differ"
	exit 1
fi
echo "release-compare: $same files byte-identical"

# Checks that a target's system packages are installed. A target that needs
# packages stops at once and names the one command that installs them,
# instead of failing deep into a run.

.PHONY: need-e2e need-promtool

## need-e2e: etcd, ip and unshare for make e2e.
need-e2e:
	@missing=; for c in etcd ip unshare; do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then echo "make e2e needs:$$missing. Run: sudo bash .ci/deps.d/e2e.sh"; exit 1; fi

## need-promtool: promtool for the alert rule tests in make test (pkg/metrics TestPromtool):
## installed by .ci/deps.d/monitoring.sh when running as root, else make stops and names it.
need-promtool:
	@command -v promtool >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "== promtool missing: bash .ci/deps.d/monitoring.sh"; bash .ci/deps.d/monitoring.sh; \
	else echo "make test needs promtool (the alert rule tests). Run: sudo bash .ci/deps.d/monitoring.sh"; exit 1; fi

unit: need-promtool

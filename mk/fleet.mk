# Fleet scale: many extractedprism nodes against real kube-apiservers and
# etcd, in a network namespace the test creates (needs root, iproute2,
# util-linux's unshare and etcd; see .ci/deps.d/e2e.sh). The Kubernetes
# binaries are the ones `make e2e-tools` builds (pinned in test/e2e/kube).
#
#   make fleet-smoke   10 nodes, short windows, generous bounds (CI)
#   make fleet         50 nodes, longer windows: the run docs/fleet.md reports
#
# Sizes: FLEET_NODES, FLEET_STREAMS, FLEET_PROBE_RATE, FLEET_PROBE_WINDOW,
# FLEET_WATCHERS (watches of the shared readiness ConfigMap).
# Both write their tables to bin/fleet-report.txt.

FLEET_NODES        ?= 50
FLEET_STREAMS      ?= 10
FLEET_PROBE_RATE   ?= 250
FLEET_PROBE_WINDOW ?= 30s
FLEET_WATCHERS     ?= 1000
FLEET_TIMEOUT      ?= 40m

.PHONY: fleet fleet-smoke

## fleet: measure probe cost, discovery convergence and reconnect waves with 50 nodes; writes bin/fleet-report.txt.
fleet: e2e-tools $(BIN)/extractedprism
	cd test/fleet && EP_FLEET_BIN=$(BIN) EP_FLEET_REPORT=$(BIN)/fleet-report.txt \
	  EP_FLEET_NODES=$(FLEET_NODES) EP_FLEET_STREAMS=$(FLEET_STREAMS) \
	  EP_FLEET_PROBE_RATE=$(FLEET_PROBE_RATE) EP_FLEET_PROBE_WINDOW=$(FLEET_PROBE_WINDOW) \
	  EP_FLEET_WATCHERS=$(FLEET_WATCHERS) \
	  nice $(GO) test -count=1 -v -timeout $(FLEET_TIMEOUT) .

## fleet-smoke: the fleet measurements with 10 nodes and short windows (a few minutes).
fleet-smoke: e2e-tools $(BIN)/extractedprism
	cd test/fleet && EP_FLEET_BIN=$(BIN) EP_FLEET_REPORT=$(BIN)/fleet-report.txt \
	  EP_FLEET_NODES=10 EP_FLEET_STREAMS=4 EP_FLEET_PROBE_RATE=200 EP_FLEET_PROBE_WINDOW=10s EP_FLEET_WATCHERS=100 \
	  nice $(GO) test -race -count=1 -v -timeout 20m .

CI_TARGETS += fleet-smoke

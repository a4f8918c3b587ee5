#!/usr/bin/env bash
# Node end-to-end tests (make node-e2e): containerd and runc to run the
# pods, the CNI plugins (bridge, host-local) for the node's pod network,
# etcd for the apiservers, ip and unshare for the test's namespaces.
set -euo pipefail
apt-get install -y -qq --no-install-recommends \
	containerd runc containernetworking-plugins etcd-server iproute2 util-linux >/dev/null

#!/usr/bin/env bash
# End-to-end tests: etcd for the real kube-apiservers; ip (iproute2) and
# unshare (util-linux) for the test's network and UTS namespaces.
set -euo pipefail
apt-get install -y -qq --no-install-recommends etcd-server iproute2 util-linux >/dev/null

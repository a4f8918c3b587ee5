# extractedprism in a real memory cgroup with the 128 MiB limit of the chart
# and the static pod, and with 64 MiB (cgroup v1's memory controller or
# cgroup v2), with its derived default proxy.max_connections, under
# 1,000 slow readers and 10,000 idle connections. Needs root; skips with a
# message without it or without a memory controller. test/memcg is a module
# of its own so that the unprivileged `go test ./...` leaves it out. It runs
# the release build from bin/ (no race detector in the daemon: that would
# multiply the memory measured); the test binary itself runs with -race.

.PHONY: memcg-test

## memcg-test: run the release build in 128 MiB and 64 MiB memory cgroups under slow readers and idle connections (root).
memcg-test: $(BIN)/extractedprism $(BIN)/standin
	cd test/memcg && EP_MEMCG_BIN=$(BIN) nice $(GO) test -race -count=1 -v -timeout 20m .

CI_TARGETS += memcg-test

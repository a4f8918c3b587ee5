# Benchmarks and chaos runs against haproxy and nginx (not part of `make test`
# nor CI). test/bench is a module of its own so that its plotting dependency
# stays out of the main go.mod.

.PHONY: bench bench-chaos bench-profile bench-test

# BENCH_BASELINE is the earlier results.json the goals compare with (bulk
# throughput must not drop below it); `make bench` reads it before it
# writes the new one. Empty or missing: no baseline.
BENCH_BASELINE ?= $(CURDIR)/docs/bench/results.json
bench_baseline = $(if $(wildcard $(BENCH_BASELINE)),--baseline $(abspath $(BENCH_BASELINE)))

## bench: measure extractedprism, haproxy, nginx and direct side by side (Go load generator and wrk); writes BENCHMARKS.md and docs/bench/.
bench: $(BIN)/extractedprism $(BIN)/standin
	cd test/bench && $(GO) run . --bin $(BIN) --out $(CURDIR)/BENCHMARKS.md $(bench_baseline) \
		--chart $(CURDIR)/docs/bench/bench.png --json $(CURDIR)/docs/bench/results.json $(BENCH_FLAGS)

## bench-chaos: run only the chaos scenarios (BENCH_SCENARIOS, default all) and merge them into BENCHMARKS.md and docs/bench/.
BENCH_SCENARIOS ?= kill,rolling,unready,sigstop,sigterm,silent,allunready,anonoff,anonoff-token
bench-chaos: $(BIN)/extractedprism $(BIN)/standin
	cd test/bench && $(GO) run . --bin $(BIN) --runs 0 --slow-readers 0 --scenarios $(BENCH_SCENARIOS) \
		--merge $(CURDIR)/docs/bench/results.json --out $(CURDIR)/BENCHMARKS.md \
		--chart $(CURDIR)/docs/bench/bench.png --json $(CURDIR)/docs/bench/results.json $(BENCH_FLAGS)

# bench-profile profiles one balancer (BENCH_PROFILE_SETUP: extractedprism,
# haproxy or nginx) with perf during wrk's keep-alive load and breaks its
# memory per idle connection down. extractedprism is built with its symbol
# table (the release build strips it) so that perf can name Go functions,
# and with test/bench/testdata/pprof.go laid over cmd/extractedprism
# (go build -overlay, the tree stays untouched) so that it serves Go's
# /debug/pprof to the harness: Go CPU, heap and goroutine profiles.
BENCH_PROFILE_SETUP    ?= extractedprism
BENCH_PROFILE_DURATION ?= 10s
BENCH_PROFILE_OUT      ?= $(CURDIR)/docs/bench/profile-$(BENCH_PROFILE_SETUP).txt

$(BIN)/profile/extractedprism: FORCE
	@mkdir -p $(@D)
	printf '{"Replace":{"%s":"%s"}}\n' $(CURDIR)/cmd/extractedprism/zz_bench_pprof.go $(CURDIR)/test/bench/testdata/pprof.go > $(@D)/overlay.json
	CGO_ENABLED=0 $(GO) build -trimpath -overlay $(@D)/overlay.json \
		-ldflags '-X github.com/extractedprism/extractedprism/pkg/version.Version=$(VERSION) -X github.com/extractedprism/extractedprism/pkg/version.Commit=$(COMMIT)' \
		-o $@ ./cmd/extractedprism

## bench-profile: perf profile (top CPU symbols) and idle-connection memory of one balancer under wrk load; writes docs/bench/profile-<setup>.txt.
bench-profile: $(BIN)/profile/extractedprism $(BIN)/standin
	cd test/bench && $(GO) run . --bin $(BIN) --ep-bin $(BIN)/profile/extractedprism --only $(BENCH_PROFILE_SETUP) \
		--duration $(BENCH_PROFILE_DURATION) --profile $(BENCH_PROFILE_OUT) $(BENCH_FLAGS)

## bench-test: unit tests of the benchmark harness (report, chart, counting).
bench-test:
	cd test/bench && $(GO) test -race -count=1 ./...

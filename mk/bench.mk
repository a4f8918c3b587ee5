# Benchmarks and chaos runs against haproxy and nginx (not part of `make test`
# nor CI). test/bench is a module of its own so that its plotting dependency
# stays out of the main go.mod.

.PHONY: bench bench-chaos bench-test

## bench: measure extractedprism, haproxy, nginx and direct side by side; writes BENCHMARKS.md and docs/bench/.
bench: $(BIN)/extractedprism $(BIN)/standin
	cd test/bench && $(GO) run . --bin $(BIN) --out $(CURDIR)/BENCHMARKS.md \
		--chart $(CURDIR)/docs/bench/bench.png --json $(CURDIR)/docs/bench/results.json $(BENCH_FLAGS)

## bench-chaos: run only the chaos scenarios (BENCH_SCENARIOS, default all) and merge them into BENCHMARKS.md and docs/bench/.
BENCH_SCENARIOS ?= kill,rolling,unready,sigstop,sigterm,silent,allunready
bench-chaos: $(BIN)/extractedprism $(BIN)/standin
	cd test/bench && $(GO) run . --bin $(BIN) --runs 0 --scenarios $(BENCH_SCENARIOS) \
		--merge $(CURDIR)/docs/bench/results.json --out $(CURDIR)/BENCHMARKS.md \
		--chart $(CURDIR)/docs/bench/bench.png --json $(CURDIR)/docs/bench/results.json $(BENCH_FLAGS)

## bench-test: unit tests of the benchmark harness (report, chart, counting).
bench-test:
	cd test/bench && $(GO) test -race -count=1 ./...

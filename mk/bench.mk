# Benchmarks and chaos runs against haproxy and nginx (not part of `make test`).
# test/bench is a module of its own so that its plotting dependencies stay
# out of the main go.mod.

.PHONY: bench

## bench: measure extractedprism, haproxy, nginx and direct side by side; writes BENCHMARKS.md and docs/bench/.
bench: $(BIN)/extractedprism $(BIN)/standin
	cd test/bench && $(GO) run . --bin $(BIN) --out $(CURDIR)/BENCHMARKS.md \
		--chart $(CURDIR)/docs/bench/bench.png --json $(CURDIR)/docs/bench/results.json $(BENCH_FLAGS)

# Configuration: the key table in docs/configuration.md is generated from the
# Config type, Defaults() and the comments of configs/extractedprism.yaml;
# `make test` fails when it is stale. `make fuzz` (root Makefile) fuzzes the
# loader.

.PHONY: config-docs

## config-docs: regenerate the key table in docs/configuration.md.
config-docs:
	$(GO) test ./pkg/config -count=1 -run TestDocsTableIsCurrent -update

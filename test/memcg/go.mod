// Module memcg runs extractedprism inside a real memory cgroup with the
// limit the chart and the static pod give it. It is a module of its own so
// that `go test ./...` of the product (unprivileged) does not pick it up;
// `make memcg-test` runs it as root.
module github.com/extractedprism/extractedprism/test/memcg

go 1.26.8

// Module fleet measures what a fleet of extractedprism nodes costs real
// kube-apiservers. It is a module of its own so that its test
// dependencies stay out of the product's go.mod; the Kubernetes binaries it
// runs are pinned in ../e2e/kube.
module github.com/extractedprism/extractedprism/test/fleet

go 1.26.8

require github.com/extractedprism/extractedprism v0.0.0

require (
	golang.org/x/net v0.59.0
	golang.org/x/text v0.42.0 // indirect
)

replace github.com/extractedprism/extractedprism => ../..

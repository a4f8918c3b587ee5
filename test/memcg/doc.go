// Package memcg checks that extractedprism stays within the 128 MiB memory
// limit the Helm chart and the kubeadm static pod give it, and within half of
// it (64 MiB), with its default connection cap, in a real memory
// cgroup (cgroup v1's memory controller or cgroup v2, whichever the machine
// has), under the loads that cost memory: clients that download through it
// but read slowly, and many idle connections (watches).
//
// The test needs root (it creates a cgroup at the top of the memory
// hierarchy and raises RLIMIT_NOFILE) and skips with a message otherwise,
// or when there is no memory controller. It runs the release build of the
// daemon (no race detector: that would multiply the memory it measures),
// from EP_MEMCG_BIN (a directory holding extractedprism and standin, as
// `make build` leaves them in bin/) or built by TestMain. Only the daemon
// runs in the cgroup; the stand-in apiservers and the clients run outside.
// Everything is on loopback; nothing sleeps as synchronisation, every wait
// polls with a generous deadline.
//
// Run it with
//
//	make memcg-test
//
// or, from this directory, as root:
//
//	go test -race -count=1 -v .
//
// TestMemoryLimit asserts that the daemon is never OOM-killed, that every
// accepted connection keeps working, and that its memory comes back once
// the clients are gone; with proxy.max_connections it also checks that
// connections beyond the limit are closed at once. It logs what it
// measured: the daemon's resident set and the cgroup's peak usage.
package memcg

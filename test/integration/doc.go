// Package integration holds end-to-end tests that run the real
// extractedprism and standin binaries as child processes on loopback and
// check what a user would see: client requests through the proxy, the
// admin endpoints, exit codes and messages.
//
// TestMain builds both binaries once per run (with -race when the tests
// run with -race). Every child process is killed when its test ends. The
// tests are Linux-only (prlimit, SO_REUSEPORT semantics, Pdeathsig).
package integration

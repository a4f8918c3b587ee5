// Package integration holds end-to-end tests that run the real
// extractedprism and standin binaries as child processes on loopback and
// check what a user would see: client requests through the proxy, the
// admin endpoints, exit codes and messages.
//
// TestMain builds both binaries once per run (with -race when the tests
// run with -race, so data races in the daemon surface here too). Every
// child process is killed when its test ends; ports come from below the
// ephemeral range; nothing sleeps as synchronisation, everything polls
// with generous deadlines. The tests are Linux-only (prlimit from
// util-linux, /proc/net/tcp, Pdeathsig) and are skipped with -short.
//
// Run them alone with
//
//	go test -race -count=1 -v ./test/integration/
//
// Scenarios, one test each:
//
//   - TestFailoverKillAndRestart: SIGKILL one of three upstreams under a
//     client loop and restart it on its port; no request fails.
//   - TestHungUpstreamMarkedDown, TestHungFromStart: an upstream that
//     accepts TCP but answers nothing is marked down within
//     interval*fall+timeout and gets no client connection afterwards.
//   - TestUnreadyUpstreamDrained: /readyz 500 upstream is marked down, its
//     streams are closed, no new connection goes there.
//   - TestAllUpstreamsDown: /readyz 503 with the reason; clients closed
//     promptly.
//   - TestSilentClientKeepsUpstreamsUp: connect-and-close port checks do
//     not mark upstreams down.
//   - TestSilentClientsMarkNothingDown: 30 clients that never send a byte,
//     held past the upstreams' handshake timeout: nothing marked down,
//     /readyz 200 throughout.
//   - TestAllUnreadyKeepsEveryStream: every upstream unready for 15 s (an
//     etcd outage): no stream cut, new requests served.
//   - TestHungUpstreamClosesSpread: a SIGSTOPped upstream's streams are
//     closed spread over close_spread, not in one instant.
//   - TestDeadOrStoppingUpstreamConnectionsNotCut: a SIGKILLed and a
//     gracefully stopping upstream: the balancer cuts none of their
//     connections.
//   - TestAllSlowMarksNoneDown: every upstream answers 6 s late: none is
//     marked down, /readyz stays 200, a request is answered late.
//   - TestDrainOnSIGTERM: readiness off, connects refused, streams flow
//     until the drain timeout, exit 0.
//   - TestAcceptSurvivesEMFILE: out of descriptors under prlimit, the
//     admin port still tells the truth, and the proxy recovers.
//   - TestBadInputExits, TestStatusAndValidateExitCodes: messages and exit
//     codes of bad input, `status` and `validate`.
//   - TestReloadUnderLoad, TestReloadMovesListener,
//     TestReloadKeepsConnections: config file reloads (renames, in-place
//     writes, ConfigMap ..data swaps, an invalid file, a listen port
//     change) without a failed request or a dropped connection.
//   - TestProxyIPv6BulkTransfer: IPv6 loopback and a 64 MiB download.
//
// The tests log measured numbers (failover and detection times, drain
// timings, request counts) with t.Logf; run with -v to see them.
package integration

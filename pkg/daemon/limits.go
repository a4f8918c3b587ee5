package daemon

import (
	"golang.org/x/sys/unix"
)

// The derived default of proxy.max_connections (the key at 0). The daemon
// owns it because it depends on the process's limits, which the
// configuration cannot know: under a memory limit it admits
//
//	(limit - connBaseBytes) / connBytes connections, within
//	[minDerivedConns, maxDerivedConns],
//
// and without one unlimitedConns; never more than the descriptor limit
// allows (two descriptors per connection, reservedFDs kept for the
// listeners, the admin server, probes, discovery and logs). Under the Helm
// chart's and the static pod's 128Mi limit that is (128 - 24) MiB / 8 KiB
// = 13,312 connections; under 64Mi, 5,120.
//
// connBaseBytes is what the daemon needs with no connection at all (its
// heap, goroutine stacks, the runtime, the mapped binary; about 6 MiB
// charged to its memory cgroup when idle, 26 MiB resident with the
// binary's pages), with room for a discovery LIST, a metrics scrape and
// 1,000 slow readers (about 11 MiB, test/memcg). connBytes is what one
// proxied connection costs the memory cgroup, measured there: about
// 1.6 KiB of user space and 5-6 KiB of the kernel's (two sockets, their
// files and epoll entries), which the cgroup charges too; 7.7 KiB in all,
// rounded up.
const (
	connBaseBytes   = 24 << 20
	connBytes       = 8 << 10
	minDerivedConns = 1024
	maxDerivedConns = 1 << 20
	unlimitedConns  = 65536
	reservedFDs     = 64
)

// connLimit is proxy.max_connections in force and where it came from.
type connLimit struct {
	n int
	// from says how n was chosen, for the log: "configured",
	// "memory limit", "no memory limit", with ", descriptor limit" when
	// that lowered it.
	from string
}

// deriveMaxConnections returns the connection cap for a configured
// proxy.max_connections (0 = derive it), a cgroup memory limit in bytes (0
// = none) and the descriptor limit RLIMIT_NOFILE (0 = unknown).
func deriveMaxConnections(configured int, memLimit int64, nofile uint64) connLimit {
	if configured > 0 {
		return connLimit{n: configured, from: "configured"}
	}
	l := connLimit{n: unlimitedConns, from: "no memory limit"}
	if memLimit > 0 {
		n := (memLimit - connBaseBytes) / connBytes
		l = connLimit{n: int(min(max(n, minDerivedConns), maxDerivedConns)), from: "memory limit"}
	}
	if fdCap := fdConnCap(nofile); fdCap > 0 && l.n > fdCap {
		l.n, l.from = fdCap, l.from+", descriptor limit"
	}
	return l
}

// fdConnCap is the most connections nofile descriptors carry (0 = no
// bound known).
func fdConnCap(nofile uint64) int {
	if nofile == 0 || nofile > 1<<40 {
		return 0
	}
	if nofile <= 2*reservedFDs {
		return max(1, int(nofile/4)) //nolint:gosec // bounded above
	}
	return int((nofile - reservedFDs) / 2) //nolint:gosec // bounded above
}

// fileLimit returns RLIMIT_NOFILE's soft limit, which the Go runtime has
// raised to the hard limit at start (0 if it cannot be read).
func fileLimit() uint64 {
	var r unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &r); err != nil {
		return 0
	}
	return r.Cur
}

// connLimitFor is deriveMaxConnections with the daemon's limits.
func (d *daemon) connLimitFor(configured int) connLimit {
	return deriveMaxConnections(configured, d.o.MemoryLimit, d.o.FileLimit)
}

// logConnLimit logs the cap in force, and warns when a configured one
// needs more descriptors than the process may open: accepts would then
// fail with EMFILE before the cap is reached.
func (d *daemon) logConnLimit(l connLimit, what string) {
	d.met.SetMaxConnections(l.n)
	args := []any{"max_connections", l.n, "from", l.from}
	if d.o.MemoryLimit > 0 {
		args = append(args, "memory_limit", d.o.MemoryLimit)
	}
	if d.o.FileLimit > 0 {
		args = append(args, "nofile", d.o.FileLimit)
	}
	d.log.Info(what, args...)
	if fdCap := fdConnCap(d.o.FileLimit); fdCap > 0 && l.n > fdCap {
		d.log.Warn("proxy.max_connections needs more file descriptors than the process may open; "+
			"accepts fail with 'too many open files' before it is reached",
			"max_connections", l.n, "nofile", d.o.FileLimit, "descriptors_needed", 2*l.n+reservedFDs)
	}
}

package daemon

import "testing"

func TestDeriveMaxConnections(t *testing.T) {
	const mi = 1 << 20
	for _, tc := range []struct {
		name       string
		configured int
		mem        int64
		nofile     uint64
		want       int
		from       string
	}{
		{"chart's 128Mi admits over 10,000", 0, 128 * mi, 1 << 20, 13312, "memory limit"},
		{"64Mi", 0, 64 * mi, 1 << 20, 5120, "memory limit"},
		{"configured wins", 500, 64 * mi, 1 << 20, 500, "configured"},
		{"configured is not capped by descriptors", 50000, 64 * mi, 1024, 50000, "configured"},
		{"no memory limit", 0, 0, 1 << 20, 65536, "no memory limit"},
		{"small limit floors at 1024", 0, 16 * mi, 1 << 20, 1024, "memory limit"},
		{"huge limit caps at 1<<20", 0, 64 << 30, 1 << 30, 1 << 20, "memory limit"},
		{"descriptors bound the derived value", 0, 128 * mi, 20000, (20000 - 64) / 2, "memory limit, descriptor limit"},
		{"descriptors bound the no-limit value", 0, 0, 1024, (1024 - 64) / 2, "no memory limit, descriptor limit"},
		{"few descriptors", 0, 0, 100, 25, "no memory limit, descriptor limit"},
		{"unknown descriptor limit", 0, 256 * mi, 0, (256*mi - 24*mi) / (8 << 10), "memory limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := deriveMaxConnections(tc.configured, tc.mem, tc.nofile)
			if got.n != tc.want || got.from != tc.from {
				t.Errorf("deriveMaxConnections(%d, %d, %d) = %+v, want %d from %q",
					tc.configured, tc.mem, tc.nofile, got, tc.want, tc.from)
			}
		})
	}
	// The chart's default limit must admit at least 10,000 connections.
	if n := deriveMaxConnections(0, 128<<20, 1<<20).n; n < 10000 {
		t.Errorf("128Mi admits %d connections, want at least 10000", n)
	}
}

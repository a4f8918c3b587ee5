package fleet

import (
	"os"
	"strconv"
	"testing"
	"time"
)

// params are the sizes and windows of a run, from the environment.
type params struct {
	// Nodes is the number of simulated nodes (EP_FLEET_NODES, default 10).
	Nodes int
	// Streams is the number of long-lived client streams per node
	// (EP_FLEET_STREAMS, default 4).
	Streams int
	// ProbeRate is the probes per second each probe style is driven at
	// (EP_FLEET_PROBE_RATE, default 200).
	ProbeRate int
	// ProbeWindow is how long each probe style (and the idle baseline) is
	// measured (EP_FLEET_PROBE_WINDOW, default 15s).
	ProbeWindow time.Duration
	// Watchers is the number of simulated nodes watching the shared
	// readiness ConfigMap (EP_FLEET_WATCHERS, default 200).
	Watchers int
}

// loadParams reads the parameters; a malformed value fails the test.
func loadParams(t *testing.T) params {
	t.Helper()
	p := params{Nodes: 10, Streams: 4, ProbeRate: 200, ProbeWindow: 15 * time.Second, Watchers: 200}
	ints := []struct {
		name string
		dst  *int
		max  int
	}{
		{"EP_FLEET_NODES", &p.Nodes, 250},
		{"EP_FLEET_STREAMS", &p.Streams, 50},
		{"EP_FLEET_PROBE_RATE", &p.ProbeRate, 5000},
		{"EP_FLEET_WATCHERS", &p.Watchers, 2000},
	}
	for _, v := range ints {
		s := os.Getenv(v.name)
		if s == "" {
			continue
		}
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > v.max {
			t.Fatalf("%s=%q: want a whole number from 1 to %d", v.name, s, v.max)
		}
		*v.dst = n
	}
	if s := os.Getenv("EP_FLEET_PROBE_WINDOW"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 5*time.Second || d > 10*time.Minute {
			t.Fatalf("EP_FLEET_PROBE_WINDOW=%q: want a duration from 5s to 10m", s)
		}
		p.ProbeWindow = d
	}
	return p
}
